r"""
---
title: A training run that never loses work or saves garbage
summary: Checkpoint contents and resume checks, periodic checkpoints, SIGINT / SIGTERM, and skipping non-finite
  steps, decided alike by every data-parallel rank.
---

# Run control

`RunControlConfigs` is the part of the training configs that keeps a run's work safe. The training loop
(`nlp_autoregression.py`) asks it three questions after every optimizer step, and all data-parallel ranks must
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

## What a checkpoint holds

The model, the optimizer with its schedule, the position in training, every rank's random states, the
configuration, the loss history, the model's name and the **data**: the vocabulary (`itos`), the absolute path of
the text and its SHA-256. Resuming checks, before the run starts, that the checkpoint is of the same model, that
its weights and optimizer state fit the configuration, and that the text is the same file content; training on
another text needs `allow_text_change=true` and keeps the checkpoint's vocabulary.
"""

import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from labml import experiment, logger, tracker
from labml.logger import Text

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.experiments.distributed import all_reduce_sum, gather_objects, max_replica_difference
from labml_nn.experiments.labml_adapter import checkpoint_folder
from labml_nn.experiments.precision import PrecisionConfigs

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


def check_int(key: str, value: Any, minimum: int, maximum: Optional[int] = None) -> None:
    """A `ValueError` naming config `key` unless `value` is an int in `[minimum, maximum]`."""
    if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
            or (maximum is not None and value > maximum)):
        bounds = f'in [{minimum}, {maximum}]' if maximum is not None else f'>= {minimum}'
        raise ValueError(f"{key} must be an int {bounds}, got {value!r}")


def _first_mismatch(error: str) -> str:
    """The first line of PyTorch's list of tensors that do not fit a `load_state_dict`, and how many more."""
    head, *details = [line.strip() for line in error.splitlines() if line.strip()] or ['']
    if not details:
        return head
    first = details[0]
    size = re.match(r'size mismatch for (\S+): copying a param with shape '
                    r'torch.Size\((.*?)\) from checkpoint, '
                    r'the shape in current model is torch.Size\((.*?)\)', first)
    if size:
        first = f'{size[1]} is {size[2]} in the checkpoint and {size[3]} in this configuration'
    return first + (f' (and {len(details) - 1} more)' if len(details) > 1 else '')


def exit_status(signum: int) -> int:
    """The shell's exit status for a process stopped by signal `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


class RunControlConfigs(PrecisionConfigs):
    """
    Run-control configs and the checkpoint of the training loop. The subclass defines `model`, `optimizer`,
    `text`, `_progress`, `_history` and `_dist`, which a checkpoint holds.
    """
    # A run UUID, run folder or checkpoint file to continue from
    resume: str = ''
    # Resume on a text other than the checkpoint's (its vocabulary is kept)
    allow_text_change: bool = False
    # Also write a checkpoint every this many optimizer steps (0: off)
    checkpoint_every: int = 0
    # Also write a checkpoint when this many minutes passed since the last one (0: off)
    checkpoint_minutes: float = 10.0
    # Stop after this many consecutive steps with a non-finite loss or gradient norm (each one is skipped)
    max_nonfinite_steps: int = 10

    def validate(self) -> None:
        """A `ValueError` naming the first bad run-control value."""
        super().validate()
        check_int('checkpoint_every', self.checkpoint_every, 0)
        check_int('max_nonfinite_steps', self.max_nonfinite_steps, 1)
        if not math.isfinite(self.checkpoint_minutes) or self.checkpoint_minutes < 0:
            raise ValueError(f"checkpoint_minutes must be a finite number >= 0 (0: off), "
                             f"got {self.checkpoint_minutes}")

    def start_control(self) -> None:
        """Start the clock and the counters (`init()`, after a checkpoint is loaded)."""
        # `run()` sets the active signal handlers; without them (a loop driven from Python) nothing stops it
        self._signals = getattr(self, '_signals', None) or StopSignals()
        self._last_save = time.monotonic()
        self._nonfinite_in_a_row = 0
        # The step of the last checkpoint this run wrote (none yet)
        self._saved_step: Optional[int] = None

    # ## Every step

    def local_flags(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """This rank's `[non-finite, stop, save]` (0 or 1), on the loss's device and dtype."""
        # With fp16's gradient scaler an overflowing gradient is the scaler's to skip, not a failed step
        grad_ok = True if self.scaler_handles_overflow() else torch.isfinite(grad_norm)
        nonfinite = ~(torch.isfinite(loss.detach()) & grad_ok)
        stop = self._signals.received is not None
        save = self._dist.is_main and 0 < self.checkpoint_minutes * 60 <= time.monotonic() - self._last_save
        return torch.stack([nonfinite.to(loss.dtype), loss.new_tensor(float(stop)),
                            loss.new_tensor(float(save))])

    def after_step(self, flags: List[float]) -> bool:
        """
        Act on the flags summed over the ranks, after the step's counters moved on: count (and stop on) non-finite
        steps, write a due checkpoint. Returns whether to stop for a signal (the caller writes that checkpoint).
        """
        nonfinite, stop, save = (f > 0 for f in flags)
        step = self._progress['step']
        if nonfinite:
            self._nonfinite_in_a_row += 1
            self._progress['skipped_steps'] += 1
            self.log([(f'Step {step:,}: ', Text.key),
                      ('non-finite loss or gradient norm; optimizer step skipped ', Text.warning),
                      (f'({self._nonfinite_in_a_row} in a row, {self._progress["skipped_steps"]} in all)',
                       Text.subtle)])
            if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"training diverged: {self._nonfinite_in_a_row} consecutive steps (steps "
                    f"{step - self._nonfinite_in_a_row + 1:,} to {step:,}) had a non-finite loss or gradient "
                    f"norm (max_nonfinite_steps={self.max_nonfinite_steps}); their optimizer steps were "
                    f"skipped. {self.last_checkpoint()}")
        else:
            self._nonfinite_in_a_row = 0
        if self._progress['skipped_steps']:
            tracker.add('skipped.train', self._progress['skipped_steps'])
        if stop:
            return True
        # Not during a run of skipped steps (nothing changed), nor at the end of an epoch or of the run, which
        # write their checkpoint after validating
        last = step == self.train_steps or self._progress['batch'] == len(self.train_loader)
        due = save or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)
        if due and not last and not nonfinite:
            self.save_checkpoint()
        return False

    # ## Checkpoints

    def state(self, rng_states: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Everything needed to continue training exactly."""
        text = self.text
        data = {'path': str(getattr(text, 'path', '')), 'sha256': getattr(text, 'sha256', ''),
                'itos': list(text.itos)}
        config = {k: v for k, v in self._overrides.items() if k != 'allow_text_change'}
        return {'version': 2, 'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'progress': dict(self._progress), 'rng': rng_states, 'config': config,
                'history': self._history, 'experiment': self.experiment_name(), 'data': data,
                'precision': self.precision_state()}

    def load_weights(self, payload: Dict[str, Any]) -> None:
        """Load the model and the optimizer of a checkpoint; a one-line `ValueError` when they do not fit."""
        try:
            self.model.load_state_dict(payload['model'])
            self.optimizer.load_state_dict(payload['optimizer'])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"resume={self.resume}: the checkpoint does not fit this configuration: "
                             f"{_first_mismatch(str(e))}") from None

    def check_resume(self, payload: Dict[str, Any]) -> None:
        """Before a run starts: the checkpoint is of this model and its weights and optimizer state fit."""
        theirs, ours = payload.get('experiment'), self.experiment_name()
        if theirs is not None and theirs != ours:
            raise ValueError(f"resume={self.resume}: the checkpoint was trained as {theirs}; "
                             f"it cannot continue as {ours} (a checkpoint continues as the model it was "
                             f"trained as)")
        self.load_weights(payload)

    def check_same_text(self, data: Dict[str, Any], path: Path, sha256: str) -> None:
        """A `ValueError` when resuming on a text other than the checkpoint's without `allow_text_change`."""
        if data.get('sha256') and data['sha256'] != sha256 and not self.allow_text_change:
            raise ValueError(f"resume={self.resume}: the checkpoint was trained on {data['path']} (sha256 "
                             f"{data['sha256'][:12]}...), this run reads {path} (sha256 {sha256[:12]}...); "
                             f"set allow_text_change=true to continue training on this text with the "
                             f"checkpoint's vocabulary")

    def load_state(self, payload: Dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimizer, position, history and (same rank count) random states."""
        self.load_weights(payload)
        self.load_precision_state(payload.get('precision'))
        self._progress.update(payload['progress'])
        self._history = payload['history']
        rng = payload['rng']
        if len(rng) == self._dist.world_size:
            ckpt.set_rng_state(rng[self._dist.rank])
        else:
            self.log(f'The checkpoint was written by {len(rng)} processes, this run has '
                     f'{self._dist.world_size}: random states are not restored', Text.warning)
        tracker.set_global_step(self._progress['step'])

    def save_checkpoint(self) -> bool:
        """
        Write the checkpoint atomically into the run's folder (main rank; every rank sends its random state).
        Nothing is written while a weight is not finite. Returns whether it was written.
        """
        self._last_save = time.monotonic()
        finite = all(torch.isfinite(p).all() for p in self.model.parameters())
        if all_reduce_sum(self._dist, torch.tensor([float(not finite)])).item() > 0:
            self.log([('Checkpoint not written: ', Text.danger), ('a weight is not finite. ', Text.warning),
                      (self.last_checkpoint(), Text.subtle)])
            return False
        rng_states = gather_objects(self._dist, ckpt.get_rng_state())
        self._progress['replica_difference'] = max_replica_difference(self._dist, self.model.parameters())
        if self._dist.is_main:
            folder = checkpoint_folder()
            if folder is None:
                raise RuntimeError("save_checkpoint() needs a labml experiment (experiment.create) "
                                   "to write into")
            path = folder / ckpt.CHECKPOINT_NAME
            ckpt.save_atomic(self.state(rng_states), path)
            logger.log([('Checkpoint: ', Text.subtle), (str(path), Text.meta),
                        (f" (step {self._progress['step']:,})", Text.subtle)])
        self._saved_step = self._progress['step']
        return True

    def last_checkpoint(self) -> str:
        """Where the last good checkpoint of this run is, in words."""
        folder = checkpoint_folder()
        path = folder / ckpt.CHECKPOINT_NAME if folder is not None else None
        if path is None or not path.is_file() or self._saved_step is None:
            return "This run has written no checkpoint."
        return f"The last checkpoint is {path} (step {self._saved_step:,})."

    def stop_for_signal(self) -> None:
        """
        Write the checkpoint, say how to resume, and raise `KeyboardInterrupt(signal number)` (labml marks the run
        *interrupted*).
        """
        signum = self._signals.received or signal.SIGINT
        self.save_checkpoint()
        self.log([(f'Stopped by {signal.Signals(signum).name} ', Text.warning),
                  (f"at step {self._progress['step']:,}. ", Text.subtle),
                  (self.last_checkpoint(), Text.meta)])
        self.log([('Resume with: ', Text.key), (self.resume_command(), Text.value)])
        raise KeyboardInterrupt(signum)

    def resume_command(self) -> str:
        """The command that continues this run (the experiment's module, under `torchrun` if this run is)."""
        module = type(self).__module__
        spec = getattr(sys.modules.get('__main__'), '__spec__', None)
        if module == '__main__':
            # `python -m <module>` (or `torchrun -m <module>`) runs the module as `__main__`
            module = spec.name if spec is not None else None
        command = f'-m {module}' if module else sys.argv[0]
        if not self._dist.is_distributed:
            return f'python {command} resume={experiment.get_uuid()}'
        local = os.environ.get('LOCAL_WORLD_SIZE', str(self._dist.world_size))
        options = (f'--standalone --nproc_per_node {local}' if local == str(self._dist.world_size)
                   else "<this run's torchrun options>")
        return f'torchrun {options} {command} resume={experiment.get_uuid()}'

    def experiment_name(self) -> str:
        """The labml experiment (folder) name for these configs."""
        return 'nlp_autoregression'

    # ## Reporting

    def log_summary(self) -> None:
        p = self._progress
        tokens_per_second = p['tokens'] / max(p['train_seconds'], 1e-9)
        self.log([('Trained ', Text.subtle), (f"{p['step']:,}", Text.value), (' steps, ', Text.subtle),
                  (f"{p['tokens']:,}", Text.value), (' tokens in ', Text.subtle),
                  (f"{p['train_seconds']:.1f}s", Text.value), (' (', Text.subtle),
                  (f'{tokens_per_second:,.0f}', Text.value), (' tokens/s', Text.subtle),
                  (f", {p['skipped_steps']} skipped" if p['skipped_steps'] else '', Text.warning),
                  (')', Text.subtle)])

    def log(self, message: Any, *args: Any) -> None:
        """`labml.logger.log`, on the main rank only."""
        if self._dist.is_main:
            logger.log(message, *args)
