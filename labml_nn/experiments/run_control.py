r"""
---
title: A training run that never loses work or saves garbage
summary: Periodic checkpoints, SIGINT / SIGTERM, and skipping non-finite steps, decided alike by every data-parallel
  rank.
---

# Run control

`RunControl` is the part of a run that keeps its work safe, an object [the trainer](trainer.html) owns. The trainer
asks it three questions after every optimizer step, and all data-parallel ranks must
answer them alike, because each answer leads to collective operations (a checkpoint gathers every rank's random
state) or to leaving the loop. So each rank puts its local answers in a small vector that rides on the one
all-reduce the step already makes for the loss, and every rank acts on the sum:

$$\big[\,\ell,\ \text{correct},\ \underbrace{\text{non-finite}}_{\text{any rank}},\
\underbrace{\text{stop}}_{\text{any rank}},\ \underbrace{\text{save}}_{\text{rank 0's clock}}\,\big].$$

## Non-finite steps

A loss or gradient norm that is NaN or $\pm\infty$ on any rank **skips** the step: no optimizer step and no
schedule step, so the weights and Adam's moments stay those of the last good step. Skipped steps are counted
(`skipped.train` in the log, `skipped_steps` in the checkpoint) and each one is reported. After
`max_nonfinite_steps` consecutive skipped steps the run stops with `TrainingDiverged` (the command line prints
`error: ...` and exits with status 3): the run has diverged, and a lower learning rate from the last checkpoint is
the way on. A checkpoint is never written with a non-finite weight, so the last good one survives.

## Periodic checkpoints

Besides the end of every epoch and of the run, a checkpoint is written every `checkpoint_every` optimizer steps
(0: off) and whenever `checkpoint_minutes` minutes of wall time have passed since the last one (default 10; 0:
off). Rank 0's clock decides, and the flag reaches every rank through the all-reduce.

## SIGINT and SIGTERM

Ctrl-C (SIGINT) or SIGTERM (what schedulers and `torchrun` send) does not interrupt the step: it sets a flag, the
step finishes, every rank agrees to stop at that step, the checkpoint is written, and the run prints where it is
and the exact command that resumes it. It then raises `KeyboardInterrupt` (labml marks the run *interrupted*);
the command line exits with status $128 + \text{signal}$: 130 for SIGINT, 143 for SIGTERM. Signals that arrive
while stopping are ignored (`torchrun` forwards the one it got to its workers, which may already have it); SIGKILL
stops at once, without a checkpoint.

What a checkpoint holds, and how a run resumes, is [checkpoint.py](checkpoint.html).
"""

import math
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from labml.logger import Text

from labml_nn.utils import check_int

# Exit status of a run stopped by `max_nonfinite_steps`
DIVERGED_EXIT_CODE = 3


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class StopSignals:
    """
    While active, SIGINT and SIGTERM set `received` (the signal number) instead of interrupting; the previous
    handlers come back on exit. Signal handlers can only be set in the main thread; elsewhere this does nothing.
    """
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                  f"(SIGKILL stops at once, without one)", file=sys.stderr, flush=True)

    def __enter__(self) -> 'StopSignals':
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def exit_status(signum: int) -> int:
    """The shell's exit status for a process stopped by signal `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def check_run_control(checkpoint_every: int, checkpoint_minutes: float, max_nonfinite_steps: int) -> None:
    """A `ValueError` naming the first bad run-control value."""
    check_int('checkpoint_every', checkpoint_every, 0)
    check_int('max_nonfinite_steps', max_nonfinite_steps, 1)
    if not math.isfinite(checkpoint_minutes) or checkpoint_minutes < 0:
        raise ValueError(f"checkpoint_minutes must be a finite number >= 0 (0: off), got {checkpoint_minutes}")


class RunControl:
    """
    * `checkpoint_every`: also write a checkpoint every this many optimizer steps (0: off)
    * `checkpoint_minutes`: also write one when this many minutes passed since the last (0: off)
    * `max_nonfinite_steps`: stop after this many consecutive non-finite steps (each one is skipped)
    * `is_main`: whether this process's clock decides the timed checkpoints (the main rank)
    """

    def __init__(self, checkpoint_every: int = 0, checkpoint_minutes: float = 10.0, max_nonfinite_steps: int = 10,
                 is_main: bool = True):
        check_run_control(checkpoint_every, checkpoint_minutes, max_nonfinite_steps)
        self.checkpoint_every = checkpoint_every
        self.checkpoint_minutes = checkpoint_minutes
        self.max_nonfinite_steps = max_nonfinite_steps
        self.is_main = is_main
        # The trainer's `run()` makes active handlers; without them (a loop driven from Python) nothing stops it
        self.signals = StopSignals()
        self.last_save = time.monotonic()
        self.nonfinite_in_a_row = 0

    # ## Every step

    def local_flags(self, loss: torch.Tensor, grad_norm: torch.Tensor, scaler_handles_overflow: bool) -> torch.Tensor:
        """This rank's `[non-finite, stop, save]` (0 or 1), on the loss's device and dtype."""
        # With fp16's gradient scaler an overflowing gradient is the scaler's to skip, not a failed step
        grad_ok = True if scaler_handles_overflow else torch.isfinite(grad_norm)
        nonfinite = ~(torch.isfinite(loss.detach()) & grad_ok)
        stop = self.signals.received is not None
        save = self.is_main and 0 < self.checkpoint_minutes * 60 <= time.monotonic() - self.last_save
        return torch.stack([nonfinite.to(loss.dtype), loss.new_tensor(float(stop)),
                            loss.new_tensor(float(save))])

    def after_step(self, flags: List[float], progress: Dict[str, Any], last: bool,
                   log: Callable[[Any], None], last_checkpoint: Callable[[], str]) -> str:
        """
        Act on the `flags` summed over the ranks, after the step's counters in `progress` moved on: count (and stop
        on) non-finite steps. Returns what the trainer does next: `'stop'` (a signal: write the checkpoint and
        leave), `'save'` (a periodic checkpoint is due) or `''`. `last`: the step ends an epoch or the run, whose
        checkpoint is written after validation anyway.
        """
        nonfinite, stop, save = (f > 0 for f in flags)
        step = progress['step']
        if nonfinite:
            self.nonfinite_in_a_row += 1
            progress['skipped_steps'] += 1
            log([(f'Step {step:,}: ', Text.key),
                 ('non-finite loss or gradient norm; optimizer step skipped ', Text.warning),
                 (f'({self.nonfinite_in_a_row} in a row, {progress["skipped_steps"]} in all)', Text.subtle)])
            if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"training diverged: {self.nonfinite_in_a_row} consecutive steps (steps "
                    f"{step - self.nonfinite_in_a_row + 1:,} to {step:,}) had a non-finite loss or gradient "
                    f"norm (max_nonfinite_steps={self.max_nonfinite_steps}); their optimizer steps were "
                    f"skipped. {last_checkpoint()}")
        else:
            self.nonfinite_in_a_row = 0
        if stop:
            return 'stop'
        # Not during a run of skipped steps (nothing changed), nor at the end of an epoch or of the run
        due = save or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)
        return 'save' if due and not last and not nonfinite else ''

    def saved(self) -> None:
        """A checkpoint was written (or tried): the clock of timed checkpoints restarts."""
        self.last_save = time.monotonic()

    def stop_signal(self) -> int:
        """The signal that asked to stop (SIGINT when none did)."""
        return self.signals.received or signal.SIGINT
