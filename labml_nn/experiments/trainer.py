r"""
---
title: The trainer
summary: One training run - the epochs, the training step read top to bottom, validation, samples, checkpoints and
  resume - calling the parts of the run that it owns.
---

# The trainer

A `Trainer` runs one training run of a model on a task. It does not inherit its features: it **owns** them, as
plain objects with small interfaces, and calls them in the order the step needs them:

| part | what the trainer asks of it |
|---|---|
| the [task](../tasks/index.html) | batches, a batch's loss and accuracy, a sample, what checkpoints keep of the data |
| [`Precision`](precision.html) | the autocast context, the backward pass, the optimizer step, the scaler's state |
| [`RunControl`](run_control.html) | after each step: skip a non-finite step, stop for a signal, save on time |
| [`RunCheckpoint`](checkpoint.html) | write the checkpoint atomically, say which one is the last good one |
| [`CarriedMemory`](carried_memory.html) | the forward pass, continuing the state of the previous batch |
| [`SeqLenCurriculum`](curriculum.html) | the training batch, cut to the stage's segment length |
| [`DistributedContext`](distributed.html) | which rank this is; the sums over ranks |

## One step

`train_step` is the whole step, top to bottom: the curriculum cuts the batch, the forward pass runs under the
precision's autocast and continues the carried memory, the task scores it, the precision runs the backward pass,
the gradient norm is clipped, run control says whether the step is finite (and whether a signal or the clock asks
to stop or to save), one all-reduce agrees on the loss and those flags across ranks, and the precision takes the
optimizer step, or skips it when any rank's step was not finite.

## The loop

Each epoch is split into `inner_iterations` parts. Every part prints a sample (when the task has one), trains on
its share of the training batches, and validates on its share of the validation batches for the progress line. At
the end of every epoch, and when training stops, the model is validated on the whole validation set (the figure to
compare runs by) and a checkpoint is written. `train_steps` stops training after that many steps, `valid_batches`
caps the validation batches: both are for quick runs. Under `torchrun`, `batch_size` is the **global** batch
([data-parallel training](distributed.html)).
"""

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from labml import experiment, logger, monit, tracker
from labml.logger import Text

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.experiments.carried_memory import CarriedMemory
from labml_nn.experiments.curriculum import SeqLenCurriculum
from labml_nn.experiments.distributed import (
    DistributedContext,
    all_reduce_sum,
    gather_objects,
    max_replica_difference,
    wrap_ddp,
)
from labml_nn.experiments.precision import Precision
from labml_nn.experiments.run_control import RunControl


@dataclass
class TrainSettings:
    """The plain settings of a run (the training configs' values)."""
    epochs: int
    # The configuration values a checkpoint stores (what was set, by the command line or Python)
    config: Optional[Dict[str, Any]] = None
    # Times per epoch to sample, train on a share of the batches, and validate on a share
    inner_iterations: int = 1
    # Stop after this many steps (0: run all epochs); validation batches per epoch (0: all)
    train_steps: int = 0
    valid_batches: int = 0
    # Clip the gradient norm to this (0: no clipping)
    grad_norm_clip: float = 1.0
    # Validate on the whole validation set before the first step too
    validate_at_start: bool = False
    # The experiment's name (its runs' folder) and its module (to say how to resume)
    experiment_name: str = 'nlp_autoregression'
    module: str = '__main__'


class Trainer:
    """
    One run: `model` (token ids `[seq_len, batch_size]` to logits `[seq_len, batch_size, n_tokens]`) trained on
    `task` with the `optimizer` (a `ScheduledOptimizer`) and the parts above.
    """

    def __init__(self, *, model: torch.nn.Module, optimizer: Any, task: Any, settings: TrainSettings,
                 device: torch.device, dist: DistributedContext, precision: Precision, control: RunControl,
                 checkpoint: ckpt.RunCheckpoint, memory: CarriedMemory, curriculum: SeqLenCurriculum):
        self.model, self.optimizer, self.task, self.settings = model, optimizer, task, settings
        self.device, self.dist = device, dist
        self.precision, self.control, self.checkpoint = precision, control, checkpoint
        self.memory, self.curriculum = memory, curriculum
        # The model as the step calls it: in `DistributedDataParallel` under torchrun
        self.ddp_model = wrap_ddp(dist, model, device)
        self.progress: Dict[str, Any] = {'epoch': 0, 'batch': 0, 'step': 0, 'tokens': 0, 'train_seconds': 0.0,
                                         'skipped_steps': 0}
        self.history: Dict[str, Any] = {'train': [], 'valid': [], 'evaluations': []}
        # The segment length the curriculum trained on last (to log its changes)
        self.stage_length = curriculum.seq_len
        # The flags of the last step, summed over ranks: `[non-finite, stop, save]`
        self.step_flags: List[float] = [0.0, 0.0, 0.0]

    # ## One step

    def train_step(self, data: torch.Tensor, target: torch.Tensor) -> float:
        """One optimizer step on a batch; returns the loss (the mean over ranks)."""
        s, step = self.settings, self.progress['step']
        # The curriculum's segment length at this step
        data, target = self.curriculum.fold(step, data.to(self.device), target.to(self.device))
        self.log_stage(data.shape[0])
        self.optimizer.zero_grad()
        # Forward pass and loss, under autocast with `precision=bf16|fp16`, continuing the carried memory
        with self.precision.autocast():
            output = self.memory.forward(self.ddp_model, data, 'train')
            loss, correct, count = self.task.loss(output, target)
        # Backward pass (gradients all-reduced by DDP), unscaled for fp16
        self.precision.backward(loss, self.optimizer.optimizer)
        # The gradient norm, clipped to `grad_norm_clip` when that is on
        max_norm = s.grad_norm_clip if s.grad_norm_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=max_norm)
        # This rank's `[non-finite, stop, save]`
        flags = self.control.local_flags(loss, grad_norm, self.precision.handles_overflow)
        # One all-reduce: the sums of the loss, the correct predictions and the flags over ranks
        local = torch.cat([torch.stack([loss.detach(), correct.to(loss.dtype)]), flags])
        loss_sum, correct_sum, *self.step_flags = all_reduce_sum(self.dist, local).tolist()
        # The optimizer step, unless some rank's loss or gradient norm was not finite
        self.precision.step(self.optimizer, skip=self.step_flags[0] != 0)
        # Every rank counts as many positions
        loss_value = loss_sum / self.dist.world_size
        tracker.add({'loss.train': loss_value,
                     'accuracy.train': correct_sum / max(count * self.dist.world_size, 1)})
        return loss_value

    def log_stage(self, length: int) -> None:
        """Log the curriculum's segment length when it changes."""
        if not self.curriculum.stages:
            return
        if length != self.stage_length:
            self.log([('Curriculum: ', Text.key), (f'seq_len {length}', Text.value),
                      (f" from step {self.progress['step']:,}", Text.subtle)])
            self.stage_length = length
        tracker.add('seq_len.train', length)

    # ## Parts of an epoch

    def train_part(self, epoch: int, end: int) -> Optional[str]:
        """
        Train on batches `progress['batch'] .. end - 1` of `epoch`. Returns why it stopped early: `'train_steps'`
        (reached), `'signal'` (every rank agreed to stop), or `None` (the part is done).
        """
        s, p = self.settings, self.progress
        if s.validate_at_start and p['step'] == 0 and not self.history['evaluations']:
            self.full_validation()
        if p['batch'] == 0:
            # Every epoch reads its streams from their start, with an empty memory
            self.memory.reset('train')
        self.ddp_model.train()
        n_batches = len(self.task.train)
        with monit.section('Train', is_partial=True):
            for idx, data, target in self.task.train.iterate(epoch, p['batch'], end):
                if 0 < s.train_steps <= p['step']:
                    # A resumed run that had reached `train_steps` already
                    return 'train_steps'
                start = time.perf_counter()
                loss = self.train_step(data, target)
                p['train_seconds'] += time.perf_counter() - start
                p['batch'] = idx + 1
                p['step'] += 1
                # Tokens of the global batch (every rank's rows)
                p['tokens'] += data.numel() * self.dist.world_size
                self.history['train'].append({'step': p['step'], 'loss': loss})
                tracker.set_global_step(p['step'])
                last = p['step'] == s.train_steps or p['batch'] == n_batches
                action = self.control.after_step(self.step_flags, p, last, self.log, self.checkpoint.describe)
                if p['skipped_steps']:
                    tracker.add('skipped.train', p['skipped_steps'])
                if action == 'save':
                    self.save_checkpoint()
                tracker.save()
                monit.progress((idx + 1) / n_batches)
                if action == 'stop':
                    return 'signal'
                if 0 < s.train_steps <= p['step']:
                    return 'train_steps'
        return None

    @torch.no_grad()
    def evaluate(self, loader: Any, start: int, end: int,
                 observe: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> Tuple[float, float]:
        """
        Mean loss and accuracy over batches `start .. end - 1` of `loader` (the same batches every time), read with
        an empty carried memory; `observe(idx, logits, target)` sees every batch (a task's breakdown).
        """
        self.ddp_model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        self.memory.reset('valid')
        with torch.random.fork_rng(devices=[]):
            for idx, data, target in loader.iterate(0, start, end):
                data, target = data.to(self.device), target.to(self.device)
                with self.precision.autocast():
                    output = self.memory.forward(self.ddp_model, data, 'valid')
                    loss, correct, count = self.task.loss(output, target)
                if observe is not None:
                    observe(idx, output, target)
                totals += torch.tensor([loss.item() * count, correct.item(), count])
        self.memory.reset('valid')
        # Sums over all ranks' rows
        loss_sum, correct, count = all_reduce_sum(self.dist, totals).tolist()
        return loss_sum / max(count, 1), correct / max(count, 1)

    def valid_part(self, start: int, end: int) -> None:
        """Validate on a share of the validation set, for the progress line (if the task reads it in parts)."""
        if start >= end or not self.task.valid_in_parts:
            return
        with monit.section('Valid', is_partial=True):
            loss, accuracy = self.evaluate(self.task.valid, start, end)
        tracker.add({'loss.valid': loss, 'accuracy.valid': accuracy})
        self.history['valid'].append({'step': self.progress['step'], 'loss': loss, 'accuracy': accuracy,
                                      'train_seconds': self.progress['train_seconds']})

    def full_validation(self) -> None:
        """Validate on the whole validation set (up to `valid_batches`): at the end of an epoch and of a run."""
        with monit.section('Validate'):
            loss, accuracy = self.evaluate(self.task.valid, 0, self.n_valid_batches())
        p = self.progress
        self.history['evaluations'].append({'epoch': p['epoch'], 'step': p['step'], 'tokens': p['tokens'],
                                            'train_seconds': p['train_seconds'], 'valid_loss': loss,
                                            'valid_accuracy': accuracy})
        self.log([(f"Step {p['step']:,}: ", Text.key), ('valid loss ', Text.subtle),
                  (f'{loss:.4f}', Text.value), (', accuracy ', Text.subtle), (f'{accuracy:.4f}', Text.value)])

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over the data-parallel ranks."""
        return all_reduce_sum(self.dist, tensor)

    def n_valid_batches(self) -> int:
        n = len(self.task.valid)
        return n if self.settings.valid_batches <= 0 else min(self.settings.valid_batches, n)

    def sample(self) -> None:
        """Print the task's sample of the model (main rank only), e.g. a greedy continuation of a prompt."""
        if not self.dist.is_main:
            return
        self.model.eval()
        with monit.section('Sample'):
            sample = self.task.sample(self.model, self.device, self.precision.autocast())
        if sample is not None:
            prompt, continuation = sample
            logger.log([(prompt, Text.subtle), (continuation, Text.value)])

    # ## The loop

    def run(self) -> None:
        """Train for `epochs` (or `train_steps`); SIGINT / SIGTERM stop it at a step with a checkpoint."""
        s, p = self.settings, self.progress
        with self.control.signals:
            n_train = len(self.task.train)
            n_valid = self.n_valid_batches()
            k = s.inner_iterations
            for epoch in monit.loop(range(p['epoch'], s.epochs)):
                for i in range(k):
                    end = (i + 1) * n_train // k
                    if p['batch'] >= end:
                        # Done before this run resumed
                        continue
                    self.sample()
                    stopped = self.train_part(epoch, end)
                    if stopped == 'signal':
                        tracker.new_line()
                        self.stop_for_signal()
                    self.valid_part(i * n_valid // k, (i + 1) * n_valid // k)
                    tracker.save()
                    tracker.new_line()
                    if stopped:
                        self.full_validation()
                        self.save_checkpoint()
                        self.log_summary()
                        return
                self.full_validation()
                p.update(epoch=epoch + 1, batch=0)
                self.save_checkpoint()
            self.log_summary()

    # ## Checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint: everything needed to continue training exactly (collective: every rank calls it)."""
        rng_states = gather_objects(self.dist, ckpt.get_rng_state())
        carried = gather_objects(self.dist, self.memory.payload())
        self.progress['replica_difference'] = max_replica_difference(self.dist, self.model.parameters())
        config = {k: v for k, v in (self.settings.config or {}).items() if k != 'allow_text_change'}
        return {'version': 2, 'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'progress': dict(self.progress), 'rng': rng_states, 'config': config, 'history': self.history,
                'experiment': self.settings.experiment_name, 'data': self.task.record(),
                'precision': self.precision.state_dict(), 'carried': carried}

    def save_checkpoint(self) -> bool:
        """
        Write the checkpoint atomically into the run's folder (main rank; every rank sends its random state and
        carried memory). Nothing is written while a weight is not finite. Returns whether it was written.
        """
        self.control.saved()
        finite = all(torch.isfinite(p).all() for p in self.model.parameters())
        if all_reduce_sum(self.dist, torch.tensor([float(not finite)])).item() > 0:
            self.log([('Checkpoint not written: ', Text.danger), ('a weight is not finite. ', Text.warning),
                      (self.checkpoint.describe(), Text.subtle)])
            return False
        path = self.checkpoint.write(self.state_dict(), self.progress['step'])
        if path is not None:
            logger.log([('Checkpoint: ', Text.subtle), (str(path), Text.meta),
                        (f" (step {self.progress['step']:,})", Text.subtle)])
        return True

    def load_state_dict(self, payload: Dict[str, Any], resume: str) -> None:
        """Continue from a checkpoint: weights, optimizer, precision, position, history, random states, memory."""
        ckpt.load_weights(self.model, self.optimizer, payload, resume)
        self.precision.load_state_dict(payload.get('precision'))
        self.progress.update(payload['progress'])
        self.history = payload['history']
        rng = payload['rng']
        if len(rng) == self.dist.world_size:
            ckpt.set_rng_state(rng[self.dist.rank])
        else:
            self.log(f'The checkpoint was written by {len(rng)} processes, this run has '
                     f'{self.dist.world_size}: random states are not restored', Text.warning)
        if self.memory.enabled and self.progress['batch'] > 0:
            restored = self.memory.load(payload.get('carried') or [], self.dist.rank, self.dist.world_size,
                                        self.model.transformer, self.device)
            if not restored:
                self.log('The checkpoint has no carried memory for this rank: the memory restarts empty at the '
                         'next segment', Text.warning)
        tracker.set_global_step(self.progress['step'])

    def stop_for_signal(self) -> None:
        """
        Write the checkpoint, say how to resume, and raise `KeyboardInterrupt(signal number)` (labml marks the run
        *interrupted*).
        """
        signum = self.control.stop_signal()
        self.save_checkpoint()
        self.log([(f'Stopped by {signal.Signals(signum).name} ', Text.warning),
                  (f"at step {self.progress['step']:,}. ", Text.subtle), (self.checkpoint.describe(), Text.meta)])
        self.log([('Resume with: ', Text.key), (self.resume_command(), Text.value)])
        raise KeyboardInterrupt(signum)

    def resume_command(self) -> str:
        """The command that continues this run (the experiment's module, under `torchrun` if this run is)."""
        return resume_command(self.dist, self.settings.module)

    # ## Reporting

    def log_summary(self) -> None:
        p = self.progress
        tokens_per_second = p['tokens'] / max(p['train_seconds'], 1e-9)
        self.log([('Trained ', Text.subtle), (f"{p['step']:,}", Text.value), (' steps, ', Text.subtle),
                  (f"{p['tokens']:,}", Text.value), (' tokens in ', Text.subtle),
                  (f"{p['train_seconds']:.1f}s", Text.value), (' (', Text.subtle),
                  (f'{tokens_per_second:,.0f}', Text.value), (' tokens/s', Text.subtle),
                  (f", {p['skipped_steps']} skipped" if p['skipped_steps'] else '', Text.warning),
                  (')', Text.subtle)])

    def log(self, message: Any, *args: Any) -> None:
        """`labml.logger.log`, on the main rank only."""
        if self.dist.is_main:
            logger.log(message, *args)


def resume_command(dist: DistributedContext, module: str) -> str:
    """The command that continues the current labml run of the experiment in `module` (`python -m`, `torchrun`)."""
    if module == '__main__':
        # `python -m <module>` (or `torchrun -m <module>`) runs the module as `__main__`
        spec = getattr(sys.modules.get('__main__'), '__spec__', None)
        module = spec.name if spec is not None else None
    command = f'-m {module}' if module else sys.argv[0]
    if not dist.is_distributed:
        return f'python {command} resume={experiment.get_uuid()}'
    local = os.environ.get('LOCAL_WORLD_SIZE', str(dist.world_size))
    options = (f'--standalone --nproc_per_node {local}' if local == str(dist.world_size)
               else "<this run's torchrun options>")
    return f'torchrun {options} {command} resume={experiment.get_uuid()}'
