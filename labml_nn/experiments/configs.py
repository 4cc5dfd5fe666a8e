r"""
---
title: The training configs
summary: Every setting of a training run as one flat set of labml configs, checked in one place, that builds the
  trainer and the parts it owns.
---

# Training configs

labml configs are the user's surface: every setting is a key that the command line (`key=value`), a labml
configuration dictionary or Python can set, and options (`model=transformer`, `optimizer.optimizer=Noam`) pick
among implementations by name. `TrainingConfigs` holds the keys of a training run, flat: the batches, the
schedule, the optimizer (`optimizer.*`), the precision, run control, carried memory and the curriculum. An
experiment is **one** class below it ([the text experiment](../transformers/feedback/experiment.html), [the
state-tracking experiment](../transformers/feedback/state_tracking.html)), with the keys of its model and its task
and an option for each of `model` and `task`.

What the configs build is plain objects: the `trainer` option makes the [trainer](trainer.html) and the parts it
owns, from the values. Nothing here runs a step.

## Checked, and recorded

Values are checked twice before anything runs:

* when they are set (`experiment.configs(conf, values)`, the command line): a string given for a key that has
  options must be one of them (`text='tiny_shakespear'` is a `ValueError` that lists the choices, instead of a
  string turning up where a dataset is expected), also for the dotted keys of a sub-config (`optimizer.*`);
* by `validate()`, every plain value against its range, and the rules between keys; the command line runs it
  before a run folder exists, and the `trainer` option runs it again.

Every plain value that was set (str, int, float, bool) is recorded in `_overrides`: the configuration that
checkpoints store and `resume=` restores.

## An experiment's defaults

An experiment sets its own defaults in `_defaults` (e.g. `{'seq_len': 64, 'optimizer.learning_rate': 3e-3}`),
given to its configs object when it is made, and never by declaring a key of a base class again with another value
(which labml would write into the base class, for every experiment in the process; see
[the labml adapter](labml_adapter.html)).
"""

import math
from typing import Any, Dict, Optional

import torch
from labml import tracker
from labml.configs import BaseConfigs, option
from torch import nn

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.experiments.carried_memory import CarriedMemory
from labml_nn.experiments.curriculum import SeqLenCurriculum, parse_curriculum
from labml_nn.experiments.distributed import DistributedContext, process_device
from labml_nn.experiments.labml_adapter import (
    check_option,
    config_options,
    prepare_labml,
    public_options,
    set_default,
)
from labml_nn.experiments.optimizer import (
    OptimizerConfigs,
    ScheduledOptimizer,
    check_optimizer_values,
    optimizer_configs,
)
from labml_nn.experiments.precision import Precision, check_precision
from labml_nn.experiments.run_control import RunControl, check_run_control
from labml_nn.experiments.trainer import Trainer, TrainSettings
from labml_nn.utils import check_int


class TrainingConfigs(BaseConfigs):
    """The keys of a training run. An experiment adds its model's and its task's keys and options."""
    # The model, `[seq_len, batch_size]` token ids to `[seq_len, batch_size, n_tokens]` logits (an option of the
    # experiment), and its width (the Noam schedule's $d_{model}$)
    model: nn.Module
    d_model: int = 512
    # The task: its batches, loss and accuracy (an option of the experiment), and its vocabulary size
    task: Any
    n_tokens: int
    # Train on CUDA when available
    use_cuda: bool = True
    device: torch.device
    seed: int = 5
    # CPU threads for PyTorch (0: PyTorch's default). The feedback models run many small operations one step at a
    # time; on a busy or small machine one thread is often faster than several.
    num_threads: int = 0
    # Sequence length and the *global* batch size (split over data-parallel ranks)
    seq_len: int = 512
    batch_size: int = 16
    epochs: int = 10
    # Times per epoch to sample, train on a share of the batches, and validate on a share
    inner_iterations: int = 1
    # Stop after this many steps (0: run all epochs); validation batches per epoch (0: all)
    train_steps: int = 0
    valid_batches: int = 0
    optimizer: ScheduledOptimizer
    # Clip the gradient norm to this (0: no clipping)
    grad_norm_clip: float = 1.0
    # Matrix products in `bf16` or `fp16` under torch.autocast, or everything in `fp32`
    precision: str = 'fp32'
    # A run UUID, run folder or checkpoint file to continue from
    resume: str = ''
    # Also write a checkpoint every this many optimizer steps (0: off), and when this many minutes passed since
    # the last one (0: off)
    checkpoint_every: int = 0
    checkpoint_minutes: float = 10.0
    # Stop after this many consecutive steps with a non-finite loss or gradient norm (each one is skipped)
    max_nonfinite_steps: int = 10
    # Train and validate on contiguous streams, carrying the detached state from batch to batch
    carry_memory: bool = False
    # `length:start_fraction,...` stages of training segment lengths ('' for none)
    seq_len_curriculum: str = ''
    # Validate on the whole validation set before the first step too (the figure of an initialization)
    validate_at_start: bool = False
    # The run: the trainer and its parts, built from the values above
    trainer: Trainer

    # An experiment's own defaults, `key` or `optimizer.key` to value
    _defaults: Dict[str, Any] = {}
    # The configs class of each dotted key prefix
    _sub_configs = {'optimizer': OptimizerConfigs}

    def __init__(self):
        # Setting up an experiment is when labml is checked and patched (never at import)
        prepare_labml()
        super().__init__()
        for key, value in self._defaults.items():
            if '.' not in key:
                set_default(self, key, value)
        # The configuration that checkpoints store; set by the launcher: the process's place in a torchrun job, and
        # the checkpoint a run resumes from
        self._overrides: Dict[str, Any] = {}
        self._dist = DistributedContext()
        self._resume_payload: Optional[Dict[str, Any]] = None

    def _set_values(self, values: Dict[str, Any]) -> None:
        """What `experiment.configs(conf, values)` calls: check option names, set, and record the plain values."""
        own = config_options(self)
        for key, value in values.items():
            prefix, _, sub_key = key.partition('.')
            if sub_key and prefix in self._sub_configs:
                check_option(key, value, public_options(self._sub_configs[prefix](), sub_key))
            elif key in own:
                check_option(key, value, [o for o in own[key] if not o.startswith('_')])
        super()._set_values(values)
        self._overrides.update({k: v for k, v in values.items() if isinstance(v, (str, int, float, bool))})

    def sub_defaults(self, prefix: str) -> Dict[str, Any]:
        """The experiment's defaults of the sub-config `prefix` (`optimizer`), without the prefix."""
        return {k[len(prefix) + 1:]: v for k, v in self._defaults.items() if k.startswith(prefix + '.')}

    # ## Checks, before anything is built

    def validate(self) -> None:
        """Check the plain values of the run (no data or model is built); a `ValueError` names the first bad one."""
        for key in ('seq_len', 'batch_size', 'epochs', 'inner_iterations'):
            check_int(key, getattr(self, key), 1)
        for key in ('train_steps', 'valid_batches', 'num_threads'):
            check_int(key, getattr(self, key), 0)
        # Seeds feed `torch.manual_seed` and the batch plans' generators, which take 64-bit integers
        check_int('seed', self.seed, 0, 2 ** 32 - 1)
        if not math.isfinite(self.grad_norm_clip) or self.grad_norm_clip < 0:
            raise ValueError(f"grad_norm_clip must be a finite number >= 0 (0 turns clipping off), "
                             f"got {self.grad_norm_clip}")
        if self.batch_size % self._dist.world_size != 0:
            raise ValueError(f"batch_size={self.batch_size} is the global batch and must be divisible by the "
                             f"number of processes ({self._dist.world_size})")
        check_precision(self.precision)
        check_run_control(self.checkpoint_every, self.checkpoint_minutes, self.max_nonfinite_steps)
        if self.seq_len_curriculum:
            parse_curriculum(self.seq_len_curriculum, self.seq_len)
            if self.carry_memory:
                raise ValueError("seq_len_curriculum cannot be combined with carry_memory=True (a curriculum "
                                 "cuts the contiguous segments that the memory is carried along)")
        # The optimizer's values, as the `optimizer` option will set them, without building the model
        check_optimizer_values(self.sub_defaults('optimizer'), self._overrides)

    def check_data(self) -> None:
        """Build the task's data (not the model) and check what depends on it."""
        n_train = len(self.task.train)
        if self.inner_iterations > n_train:
            raise ValueError(f"inner_iterations={self.inner_iterations} is more than the {n_train} training "
                             f"batches of an epoch")

    def check_resume(self, payload: Dict[str, Any]) -> None:
        """Before a run starts: the checkpoint is of this experiment and its weights and optimizer state fit."""
        theirs, ours = payload.get('experiment'), self.experiment_name()
        if theirs is not None and theirs != ours:
            raise ValueError(f"resume={self.resume}: the checkpoint was trained as {theirs}; "
                             f"it cannot continue as {ours} (a checkpoint continues as the model it was "
                             f"trained as)")
        ckpt.load_weights(self.model, self.optimizer, payload, self.resume)

    def experiment_name(self) -> str:
        """The labml experiment (folder) name for these configs."""
        return 'nlp_autoregression'

    def total_steps(self) -> int:
        """The optimizer steps of the whole run: `train_steps`, else every batch of every epoch."""
        return self.train_steps if self.train_steps > 0 else self.epochs * len(self.task.train)

    def run(self) -> None:
        """Train (inside `experiment.start()`); SIGINT / SIGTERM stop at a step with a checkpoint."""
        self.trainer.run()


@option(TrainingConfigs.device)
def _device(c: TrainingConfigs) -> torch.device:
    return process_device(c._dist, c.use_cuda)


@option(TrainingConfigs.optimizer)
def _optimizer(c: TrainingConfigs) -> OptimizerConfigs:
    # The run's length is for `optimizer.optimizer=AdamCosine`
    return optimizer_configs(c.model.parameters(), c.d_model, c.sub_defaults('optimizer'), c.total_steps())


@option(TrainingConfigs.trainer)
def _trainer(c: TrainingConfigs) -> Trainer:
    """Build the run: the model (from the seed), the task's data, the optimizer, and the trainer's parts."""
    c.validate()
    if c.num_threads > 0:
        torch.set_num_threads(c.num_threads)
    # The same initial weights on every rank; dropout draws differ per rank
    torch.manual_seed(c.seed)
    model = c.model
    torch.manual_seed(c.seed + 7919 * c._dist.rank)
    # The data first (its checks give the clear errors), then the optimizer, which reads the run's length
    c.check_data()
    settings = TrainSettings(epochs=c.epochs, inner_iterations=c.inner_iterations, train_steps=c.train_steps,
                             valid_batches=c.valid_batches, grad_norm_clip=c.grad_norm_clip,
                             validate_at_start=c.validate_at_start, experiment_name=c.experiment_name(),
                             module=type(c).__module__, config=c._overrides)
    trainer = Trainer(model=model, optimizer=c.optimizer, task=c.task, settings=settings, device=c.device,
                      dist=c._dist, precision=Precision(c.precision, c.device),
                      control=RunControl(c.checkpoint_every, c.checkpoint_minutes, c.max_nonfinite_steps,
                                         c._dist.is_main),
                      checkpoint=ckpt.RunCheckpoint(c._dist.is_main), memory=CarriedMemory(c.carry_memory),
                      curriculum=SeqLenCurriculum(c.seq_len_curriculum, c.seq_len, c.total_steps()))
    if c._resume_payload is not None:
        trainer.load_state_dict(c._resume_payload, c.resume)
        c._resume_payload = None
    # A new run counts steps from its own start (labml's step counter outlives runs in one process)
    tracker.set_global_step(trainer.progress['step'])
    return trainer
