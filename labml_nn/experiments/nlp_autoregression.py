r"""
---
title: Configurable character-level autoregressive training
summary: labml configs and a training loop for next-character prediction, with sampling, checkpoints, resume and DDP.
---

# Autoregressive training on characters

A language model reads tokens $x_0 \dots x_{T-1}$ and predicts each next one; we minimize the cross entropy

$$\mathcal{L} = -\frac{1}{T}\sum_{t} \log p_\theta(x_{t+1} \mid x_0 \dots x_t).$$

`NLPAutoRegressionConfigs` gathers everything except the model as labml configurations, so any of it can be set
from the command line: the text and its character vocabulary, shuffled batches, the optimizer and its schedule,
gradient clipping, how often to validate and sample, and checkpoints. An experiment subclasses it and adds a
`model` option.

## The loop

Each epoch is split into `inner_iterations` parts. Every part prints a sample (a continuation of `prompt`),
trains on its share of the training batches, and validates on its share of the validation batches for the
progress line. At the end of every epoch, and when training stops, the model is validated on the whole
validation set (the figure to compare runs by) and a checkpoint is written (see `checkpoint.py`; periodic
checkpoints, stop signals and non-finite steps are `run_control.py`'s). `train_steps` stops training after that
many steps, `valid_batches` caps the validation batches: both are for quick runs.

What can be checked before a run starts is: `validate()` checks the plain values (the optimizer's too),
`check_data()` builds the text and its batches and checks what depends on them. The command line runs both (and
the resume checks) before it creates a run; `init()` runs them again for runs started from Python.

`train_step` and `forward_loss` are small methods on purpose: variants (memory carried across batches,
curricula, initialization from another run) override them. Under `torchrun`, `batch_size` is the **global**
batch ([data-parallel training](distributed.html)).
"""

import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from labml import logger, monit, tracker
from labml.configs import option
from labml.logger import Text
from labml_helpers.datasets.text import TextDataset
from torch import nn

from labml_nn.experiments.distributed import DistributedContext, all_reduce_sum, process_device, wrap_ddp
from labml_nn.experiments.optimizer import (
    OptimizerConfigs,
    ScheduledOptimizer,
    check_optimizer_values,
    optimizer_configs,
)
from labml_nn.experiments.run_control import RunControlConfigs, StopSignals, check_int
from labml_nn.experiments.text_data import (
    SequenceBatches,
    character_tokenizer,
    load_text,
    read_utf8,
    resolve_text_path,
)
from labml_nn.transformers.feedback.autoregressive import greedy_continuation


class NLPAutoRegressionConfigs(RunControlConfigs):
    """Configurations of character-level autoregressive training. `model` is left to the experiment."""
    # The model, `[seq_len, batch_size]` token ids to `[seq_len, batch_size, n_tokens]` logits, and its width (the
    # Noam schedule's $d_{model}$)
    model: nn.Module
    d_model: int = 512
    # Train on CUDA when available
    use_cuda: bool = True
    device: torch.device
    # The text: `text_path`, else `$TINY_SHAKESPEARE_PATH`, else labml's data folder (downloaded once)
    text_path: str = ''
    tokenizer: Callable = 'character'
    text: TextDataset
    n_tokens: int
    # Sequence length and the *global* batch size (split over data-parallel ranks) of the batches
    seq_len: int = 512
    batch_size: int = 16
    train_loader: SequenceBatches
    valid_loader: SequenceBatches
    epochs: int = 10
    # Times per epoch to sample, train on a share of the batches, and validate on a share
    inner_iterations: int = 1
    # Stop after this many steps (0: run all epochs); validation batches per epoch (0: all)
    train_steps: int = 0
    valid_batches: int = 0
    optimizer: ScheduledOptimizer
    loss_func: nn.Module
    # Clip the gradient norm to this (0: no clipping)
    grad_norm_clip: float = 1.0
    # Sampling: `prompt`, greedy continuation of `sample_tokens` tokens joined by `prompt_separator`
    prompt: str = 'It is'
    prompt_separator: str = ''
    sample_tokens: int = 50
    seed: int = 5
    # CPU threads for PyTorch (0: PyTorch's default). The feedback models run many small operations one step at
    # a time; on a busy or small machine one thread is often faster than several.
    num_threads: int = 0
    # Defaults of the `optimizer.*` configs for this experiment (the command line overrides them)
    _optimizer_defaults = {'optimizer': 'Adam', 'learning_rate': 1e-3}
    # The configs class of each dotted key prefix
    _sub_configs = {'optimizer': OptimizerConfigs}

    def __init__(self):
        super().__init__()
        # Set by the launcher before training starts
        self._dist = DistributedContext()
        self._resume_payload: Optional[Dict[str, Any]] = None

    def validate(self) -> None:
        """Check the plain values (no data or model is built); a `ValueError` names the first bad one."""
        super().validate()
        for key in ('seq_len', 'batch_size', 'epochs', 'inner_iterations'):
            check_int(key, getattr(self, key), 1)
        for key in ('train_steps', 'valid_batches', 'sample_tokens', 'num_threads'):
            check_int(key, getattr(self, key), 0)
        # Seeds feed `torch.manual_seed` and the batch plans' generators, which take 64-bit integers
        check_int('seed', self.seed, 0, 2 ** 32 - 1)
        if not math.isfinite(self.grad_norm_clip) or self.grad_norm_clip < 0:
            raise ValueError(f"grad_norm_clip must be a finite number >= 0 (0 turns clipping off), "
                             f"got {self.grad_norm_clip}")
        if self.batch_size % self._dist.world_size != 0:
            raise ValueError(f"batch_size={self.batch_size} is the global batch and must be divisible by the "
                             f"number of processes ({self._dist.world_size})")
        # The optimizer's values, as `_optimizer` will set them, without building the model
        check_optimizer_values(self._optimizer_defaults, self._overrides)

    def check_data(self) -> None:
        """Build the text and its batches (not the model) and check what depends on them."""
        for name, part in (('train_loader', 'training text (its first 90%)'),
                           ('valid_loader', 'validation text (its last 10%)')):
            try:
                getattr(self, name)
            except ValueError as e:
                raise ValueError(f"text_path={self.text.path}: the {part} is too short: {e}") from None
        n_train = len(self.train_loader)
        if self.inner_iterations > n_train:
            raise ValueError(f"inner_iterations={self.inner_iterations} is more than the {n_train} training "
                             f"batches of an epoch")
        if self.sample_tokens > 0 and len(self.text.text_to_i(self.prompt)) == 0:
            raise ValueError(f"prompt={self.prompt!r} has no characters of the text's vocabulary "
                             f"to start a sample")

    def init(self) -> None:
        """Build everything, wrap the model for data-parallel training, and restore a checkpoint if resuming."""
        self.validate()
        if self.num_threads > 0:
            torch.set_num_threads(self.num_threads)
        # The same initial weights on every rank; dropout draws differ per rank
        torch.manual_seed(self.seed)
        self._ddp_model = wrap_ddp(self._dist, self.model, self.device)
        self.start_precision(self.device)
        torch.manual_seed(self.seed + 7919 * self._dist.rank)
        self._progress = {'epoch': 0, 'batch': 0, 'step': 0, 'tokens': 0, 'train_seconds': 0.0,
                          'skipped_steps': 0}
        self._history: Dict[str, List[Dict[str, float]]] = {'train': [], 'valid': [], 'evaluations': []}
        # The data first (its checks give the clear errors), then the optimizer, which reads the run's length
        self.check_data()
        _ = self.optimizer
        self._sample_prompt = self.text.text_to_i(self.prompt)
        if self._resume_payload is not None:
            self.load_state(self._resume_payload)
            self._resume_payload = None
        # A new run counts steps from its own start (labml's step counter outlives runs in one process)
        tracker.set_global_step(self._progress['step'])
        self.start_control()

    # ## One step

    def forward_loss(self, data: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy loss (mean over tokens) and the number of correct argmax predictions."""
        output = self.model_output(data)
        loss = self.loss_func(output.view(-1, output.shape[-1]), target.view(-1))
        correct = (output.detach().argmax(dim=-1) == target).sum()
        return loss, correct

    def model_output(self, data: torch.Tensor) -> torch.Tensor:
        """Logits `[seq_len, batch_size, n_tokens]` of a batch (a variant may pass a state along)."""
        return self._ddp_model(data)

    def train_step(self, data: torch.Tensor, target: torch.Tensor) -> float:
        """
        Forward, backward (gradients all-reduced by DDP), clip, and the optimizer step unless the loss or gradient
        norm is not finite on a rank; returns the global mean loss and leaves the agreed flags in `_step_flags`.
        """
        data, target = data.to(self.device), target.to(self.device)
        self.optimizer.zero_grad()
        # Under autocast with `precision=bf16|fp16` ([precision.py](precision.html))
        with self.autocast():
            loss, correct = self.forward_loss(data, target)
        self.backward(loss, self.optimizer.optimizer)
        # The gradient norm, clipped to `grad_norm_clip` when that is on
        max_norm = self.grad_norm_clip if self.grad_norm_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=max_norm)
        # One all-reduce: the sums of the loss and the correct predictions over ranks, and the flags
        local = torch.cat([torch.stack([loss.detach(), correct.to(loss.dtype)]),
                           self.local_flags(loss, grad_norm)])
        loss_sum, correct_sum, *self._step_flags = all_reduce_sum(self._dist, local).tolist()
        self.optimizer_step(self.optimizer, skip=self._step_flags[0] != 0)
        # Every rank has the same number of tokens
        loss_value = loss_sum / self._dist.world_size
        accuracy = correct_sum / max(self.count_targets(target) * self._dist.world_size, 1)
        tracker.add({'loss.train': loss_value, 'accuracy.train': accuracy})
        return loss_value

    # ## Parts of an epoch

    def train_part(self, epoch: int, end: int) -> Optional[str]:
        """
        Train on batches `progress['batch'] .. end - 1` of `epoch`. Returns why it stopped early: `'train_steps'`
        (reached), `'signal'` (every rank agreed to stop), or `None` (the part is done).
        """
        self._ddp_model.train()
        n_batches = len(self.train_loader)
        tokens_per_step = self.seq_len * self.batch_size
        with monit.section('Train', is_partial=True):
            for idx, data, target in self.train_loader.iterate(epoch, self._progress['batch'], end):
                if 0 < self.train_steps <= self._progress['step']:
                    # A resumed run that had reached `train_steps` already
                    return 'train_steps'
                start = time.perf_counter()
                loss = self.train_step(data, target)
                self._progress['train_seconds'] += time.perf_counter() - start
                self._progress['batch'] = idx + 1
                self._progress['step'] += 1
                self._progress['tokens'] += tokens_per_step
                self._history['train'].append({'step': self._progress['step'], 'loss': loss})
                tracker.set_global_step(self._progress['step'])
                stop = self.after_step(self._step_flags)
                tracker.save()
                monit.progress((idx + 1) / n_batches)
                if stop:
                    return 'signal'
                if 0 < self.train_steps <= self._progress['step']:
                    return 'train_steps'
        return None

    def count_targets(self, target: torch.Tensor) -> int:
        """How many positions of `target` the loss and the accuracy count (a task may leave some out)."""
        return target.numel()

    @torch.no_grad()
    def evaluate(self, start: int, end: int, loader: Optional[Any] = None) -> Tuple[float, float]:
        """
        Mean loss and accuracy over validation batches `start .. end - 1` (the same batches every time), or over
        the batches of another `loader`.
        """
        self._ddp_model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):
            for _, data, target in (self.valid_loader if loader is None else loader).iterate(0, start, end):
                data, target = data.to(self.device), target.to(self.device)
                with self.autocast():
                    loss, correct = self.forward_loss(data, target)
                count = self.count_targets(target)
                totals += torch.tensor([loss.item() * count, correct.item(), count])
        # Sums over all ranks' rows
        loss_sum, correct, count = all_reduce_sum(self._dist, totals).tolist()
        return loss_sum / max(count, 1), correct / max(count, 1)

    def valid_part(self, start: int, end: int) -> None:
        """Validate on a share of the validation set, for the progress line."""
        if start >= end:
            return
        with monit.section('Valid', is_partial=True):
            loss, accuracy = self.evaluate(start, end)
        tracker.add({'loss.valid': loss, 'accuracy.valid': accuracy})
        self._history['valid'].append({'step': self._progress['step'], 'loss': loss, 'accuracy': accuracy,
                                       'train_seconds': self._progress['train_seconds']})

    def full_validation(self) -> None:
        """Validate on the whole validation set (up to `valid_batches`): at the end of an epoch and of a run."""
        with monit.section('Validate'):
            loss, accuracy = self.evaluate(0, self.n_valid_batches())
        p = self._progress
        self._history['evaluations'].append({'epoch': p['epoch'], 'step': p['step'], 'tokens': p['tokens'],
                                             'train_seconds': p['train_seconds'], 'valid_loss': loss,
                                             'valid_accuracy': accuracy})
        self.log([(f"Step {p['step']:,}: ", Text.key), ('valid loss ', Text.subtle),
                  (f'{loss:.4f}', Text.value), (', accuracy ', Text.subtle), (f'{accuracy:.4f}', Text.value)])

    def make_loader(self, text: str, is_train: bool) -> SequenceBatches:
        """The batches of the training (`is_train`) or validation text; a variant may read it differently."""
        return shuffled_batches(self, text, is_train)

    def total_steps(self) -> int:
        """The optimizer steps of the whole run: `train_steps`, else every batch of every epoch."""
        return self.train_steps if self.train_steps > 0 else self.epochs * len(self.train_loader)

    def n_valid_batches(self) -> int:
        n = len(self.valid_loader)
        return n if self.valid_batches <= 0 else min(self.valid_batches, n)

    @torch.no_grad()
    def sample(self) -> None:
        """Print a greedy continuation of `prompt` through labml's logger (main rank only)."""
        if not self._dist.is_main or self.sample_tokens <= 0:
            return
        self.model.eval()
        prompt = self._sample_prompt.to(self.device)
        # Cached generation, greedy: one step per new token
        with monit.section('Sample'), torch.random.fork_rng(devices=[]), self.autocast():
            tokens = greedy_continuation(self.model, prompt, self.sample_tokens)
        text = self.prompt_separator.join(self.text.itos[t] for t in tokens)
        logger.log([(self.prompt, Text.subtle), (self.prompt_separator + text, Text.value)])

    # ## The training loop

    def run(self) -> None:
        """Train for `epochs` (or `train_steps`); SIGINT / SIGTERM stop it at a step with a checkpoint."""
        with StopSignals() as self._signals:
            with monit.section('Initialize'):
                self.init()
            n_train = len(self.train_loader)
            n_valid = self.n_valid_batches()
            k = self.inner_iterations
            for epoch in monit.loop(range(self._progress['epoch'], self.epochs)):
                for i in range(k):
                    end = (i + 1) * n_train // k
                    if self._progress['batch'] >= end:
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
                self._progress.update(epoch=epoch + 1, batch=0)
                self.save_checkpoint()
            self.log_summary()


@option(NLPAutoRegressionConfigs.device)
def _device(c: NLPAutoRegressionConfigs) -> torch.device:
    return process_device(c._dist, c.use_cuda)


@option(NLPAutoRegressionConfigs.tokenizer, 'character')
def _character_tokenizer(c: NLPAutoRegressionConfigs) -> Callable:
    return character_tokenizer


# Option names as labml_nn's, so its configuration dictionaries run unchanged

@option(NLPAutoRegressionConfigs.text, 'tiny_shakespeare')
def _text(c: NLPAutoRegressionConfigs) -> TextDataset:
    """The text file (Tiny Shakespeare unless `text_path` says otherwise), with a resumed checkpoint's vocabulary."""
    from labml import lab
    path = resolve_text_path(c.text_path, lab.get_data_path())
    text, sha256 = read_utf8(path)
    # Resuming: the same text as the checkpoint's (unless `allow_text_change`), read with its vocabulary
    data = (c._resume_payload or {}).get('data') or {}
    c.check_same_text(data, path, sha256)
    return load_text(path, c.tokenizer, itos=data.get('itos'), read=(text, sha256))


@option(NLPAutoRegressionConfigs.n_tokens)
def _n_tokens(c: NLPAutoRegressionConfigs) -> int:
    return c.text.n_tokens


@option(NLPAutoRegressionConfigs.loss_func)
def _cross_entropy(c: NLPAutoRegressionConfigs) -> nn.Module:
    return nn.CrossEntropyLoss()


@option(NLPAutoRegressionConfigs.optimizer)
def _optimizer(c: NLPAutoRegressionConfigs) -> OptimizerConfigs:
    # The run's length is for `optimizer.optimizer=AdamCosine`
    return optimizer_configs(c.model.parameters(), c.d_model, c._optimizer_defaults, c.total_steps())


def shuffled_batches(c: NLPAutoRegressionConfigs, text: str, is_train: bool) -> SequenceBatches:
    """Shuffled sequences of `text` (with random offsets for training), this rank's rows of every batch."""
    return SequenceBatches(c.text.text_to_i(text), seq_len=c.seq_len, batch_size=c.batch_size, shuffle=True,
                           random_offset=is_train, seed=c.seed if is_train else c.seed + 1,
                           rank=c._dist.rank, world_size=c._dist.world_size)


@option(NLPAutoRegressionConfigs.train_loader, 'shuffled_train_loader')
def _train_loader(c: NLPAutoRegressionConfigs) -> SequenceBatches:
    return c.make_loader(c.text.train, True)


@option(NLPAutoRegressionConfigs.valid_loader, 'shuffled_valid_loader')
def _valid_loader(c: NLPAutoRegressionConfigs) -> SequenceBatches:
    return c.make_loader(c.text.valid, False)
