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
validation set (the figure to compare runs by) and a checkpoint is written (see `checkpoint.py`).
`train_steps` stops training after that many optimizer steps, `valid_batches` caps the validation batches:
both are for quick runs.

`train_step` and `forward_loss` are small methods on purpose: variants (memory carried across batches,
curricula, initialization from another run) override them.

## Data parallel

Under `torchrun` `batch_size` is the **global** batch: each of $N$ ranks trains on `batch_size / N` rows of
every batch, and the loss, its gradients and the hyper-parameters mean the same as on one process.
"""

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from labml import logger, monit, tracker
from labml.configs import BaseConfigs, option
from labml.internal.experiment import experiment_singleton
from labml.logger import Text
from labml_helpers.datasets.text import TextDataset, TextFileDataset
from torch import nn

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.experiments.distributed import DistributedContext, all_reduce_sum, gather_objects, max_replica_difference
from labml_nn.experiments.optimizer import OptimizerConfigs, ScheduledOptimizer
from labml_nn.experiments.text_data import SequenceBatches, character_tokenizer, resolve_text_path


class NLPAutoRegressionConfigs(BaseConfigs):
    """
    Configurations of character-level autoregressive training. `model` is left to the experiment.
    """
    # The model, `[seq_len, batch_size]` token ids to `[seq_len, batch_size, n_tokens]` logits
    model: nn.Module
    # Train on CUDA when available
    use_cuda: bool = True
    device: torch.device
    # The text: `text_path`, else `$TINY_SHAKESPEARE_PATH`, else labml's data folder (downloaded once)
    text_path: str = ''
    tokenizer: Callable = 'character'
    text: TextDataset
    n_tokens: int
    # Sequence length and the *global* batch size (split over data-parallel ranks)
    seq_len: int = 512
    batch_size: int = 16
    epochs: int = 10
    # Times per epoch to sample, train on a share of the batches, and validate on a share
    inner_iterations: int = 1
    # Stop after this many optimizer steps (0: run all epochs); validation batches per epoch (0: all)
    train_steps: int = 0
    valid_batches: int = 0
    # Clip the gradient norm to this (0: no clipping)
    grad_norm_clip: float = 1.0
    optimizer: ScheduledOptimizer
    loss_func: nn.Module
    train_loader: SequenceBatches
    valid_loader: SequenceBatches
    # Sampling: `prompt`, greedy continuation of `sample_tokens` tokens joined by `prompt_separator`
    prompt: str = 'It is'
    prompt_separator: str = ''
    sample_tokens: int = 50
    seed: int = 5
    # CPU threads for PyTorch (0: PyTorch's default). The feedback models run many small operations one step at
    # a time; on a busy or small machine one thread is often faster than several.
    num_threads: int = 0
    # A run UUID, run folder or checkpoint file to continue from
    resume: str = ''
    # Defaults of the `optimizer.*` configs for this experiment (the command line overrides them)
    _optimizer_defaults = {'optimizer': 'Adam', 'learning_rate': 1e-3}

    def __init__(self):
        super().__init__()
        # Set by the launcher before training starts
        self._dist = DistributedContext()
        self._overrides: Dict[str, Any] = {}
        self._resume_payload: Optional[Dict[str, Any]] = None

    def validate(self) -> None:
        """Check the plain values (no data or model is built); a `ValueError` names the first bad one."""
        for key in ('seq_len', 'batch_size', 'epochs', 'inner_iterations'):
            check_int(key, getattr(self, key), 1)
        for key in ('train_steps', 'valid_batches', 'sample_tokens', 'num_threads'):
            check_int(key, getattr(self, key), 0)
        if self.grad_norm_clip < 0:
            raise ValueError(f"grad_norm_clip must be >= 0 (0 turns clipping off), got {self.grad_norm_clip}")
        if self.batch_size % self._dist.world_size != 0:
            raise ValueError(f"batch_size={self.batch_size} is the global batch and must be divisible by the "
                             f"number of processes ({self._dist.world_size})")

    def experiment_name(self) -> str:
        """The labml experiment (folder) name for these configs."""
        return 'nlp_autoregression'

    def init(self) -> None:
        """Build everything, wrap the model for data-parallel training, and restore a checkpoint if resuming."""
        if self.num_threads > 0:
            torch.set_num_threads(self.num_threads)
        # The same initial weights on every rank; dropout draws differ per rank
        torch.manual_seed(self.seed)
        model = self.model
        self._ddp_model = model
        if self._dist.is_distributed:
            device_ids = [self.device.index] if self.device.type == 'cuda' else None
            self._ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        torch.manual_seed(self.seed + 7919 * self._dist.rank)
        self._progress = {'epoch': 0, 'batch': 0, 'step': 0, 'tokens': 0, 'train_seconds': 0.0}
        self._history: Dict[str, List[Dict[str, float]]] = {'train': [], 'valid': [], 'evaluations': []}
        _ = self.optimizer, self.train_loader, self.valid_loader
        self._sample_prompt = self.text.text_to_i(self.prompt)
        if self.sample_tokens > 0 and len(self._sample_prompt) == 0:
            raise ValueError(f"prompt={self.prompt!r} has no characters of the text's vocabulary to start a sample")
        if self._resume_payload is not None:
            self.load_state(self._resume_payload)
            self._resume_payload = None
        # A new run counts steps from its own start (labml's step counter outlives runs in one process)
        tracker.set_global_step(self._progress['step'])

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
        """Forward, backward (gradients all-reduced by DDP), clip, optimizer step; returns the global mean loss."""
        data, target = data.to(self.device), target.to(self.device)
        self.optimizer.zero_grad()
        loss, correct = self.forward_loss(data, target)
        loss.backward()
        if self.grad_norm_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.grad_norm_clip)
        self.optimizer.step()
        # Mean over ranks (every rank has the same number of tokens)
        stats = all_reduce_sum(self._dist, torch.stack([loss.detach(), correct.to(loss.dtype)]))
        loss_value = stats[0].item() / self._dist.world_size
        accuracy = stats[1].item() / max(self.count_targets(target) * self._dist.world_size, 1)
        tracker.add({'loss.train': loss_value, 'accuracy.train': accuracy})
        return loss_value

    # ## Parts of an epoch

    def train_part(self, epoch: int, end: int) -> bool:
        """Train on batches `progress['batch'] .. end - 1` of `epoch`; `True` if `train_steps` was reached."""
        self._ddp_model.train()
        n_batches = len(self.train_loader)
        tokens_per_step = self.seq_len * self.batch_size
        with monit.section('Train', is_partial=True):
            for idx, data, target in self.train_loader.iterate(epoch, self._progress['batch'], end):
                start = time.perf_counter()
                loss = self.train_step(data, target)
                self._progress['train_seconds'] += time.perf_counter() - start
                self._progress['batch'] = idx + 1
                self._progress['step'] += 1
                self._progress['tokens'] += tokens_per_step
                self._history['train'].append({'step': self._progress['step'], 'loss': loss})
                tracker.set_global_step(self._progress['step'])
                tracker.save()
                monit.progress((idx + 1) / n_batches)
                if 0 < self.train_steps <= self._progress['step']:
                    return True
        return False

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
        self.log([(f"Step {p['step']:,}: ", Text.key), ('valid loss ', Text.subtle), (f'{loss:.4f}', Text.value),
                  (', accuracy ', Text.subtle), (f'{accuracy:.4f}', Text.value)])

    def check_data(self) -> None:
        """Before a run starts: make sure the data can be had (here: find or download the text)."""
        from labml import lab
        resolve_text_path(self.text_path, lab.get_data_path())

    def make_loader(self, text: str, is_train: bool) -> SequenceBatches:
        """The batches of the training (`is_train`) or validation text; a variant may read it differently."""
        return shuffled_batches(self, text, is_train)

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
        with monit.section('Sample'), torch.random.fork_rng(devices=[]):
            if hasattr(self.model, 'generate'):
                # Cached generation, greedy (temperature 0)
                out = self.model.generate(prompt[:, None], self.sample_tokens, temperature=0.0)
                tokens = out[len(prompt):, 0].tolist()
            else:
                tokens = greedy_continuation(self.model, prompt, self.sample_tokens)
        text = self.prompt_separator.join(self.text.itos[t] for t in tokens)
        logger.log([(self.prompt, Text.subtle), (self.prompt_separator + text, Text.value)])

    # ## The training loop

    def run(self) -> None:
        with monit.section('Initialize'):
            self.init()
        n_train = len(self.train_loader)
        if self.inner_iterations > n_train:
            raise ValueError(f"inner_iterations={self.inner_iterations} is more than the {n_train} training "
                             f"batches of an epoch")
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

    def log(self, message: Any, *args: Any) -> None:
        """`labml.logger.log`, on the main rank only."""
        if self._dist.is_main:
            logger.log(message, *args)

    def log_summary(self) -> None:
        p = self._progress
        tokens_per_second = p['tokens'] / max(p['train_seconds'], 1e-9)
        self.log([('Trained ', Text.subtle), (f"{p['step']:,}", Text.value), (' steps, ', Text.subtle),
                    (f"{p['tokens']:,}", Text.value), (' tokens in ', Text.subtle),
                    (f"{p['train_seconds']:.1f}s", Text.value), (' (', Text.subtle),
                    (f'{tokens_per_second:,.0f}', Text.value), (' tokens/s)', Text.subtle)])

    # ## Checkpoints

    def state(self, rng_states: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Everything needed to continue training exactly."""
        return {'version': 1, 'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'progress': dict(self._progress), 'rng': rng_states, 'config': dict(self._overrides),
                'history': self._history}

    def load_state(self, payload: Dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(payload['model'])
        except RuntimeError as e:
            raise ValueError(f"The checkpoint's model does not match this configuration: {e}") from e
        self.optimizer.load_state_dict(payload['optimizer'])
        self._progress.update(payload['progress'])
        self._history = payload['history']
        rng = payload['rng']
        if len(rng) == self._dist.world_size:
            ckpt.set_rng_state(rng[self._dist.rank])
        else:
            self.log(f'The checkpoint was written by {len(rng)} processes, this run has '
                       f'{self._dist.world_size}: random states are not restored', Text.warning)
        tracker.set_global_step(self._progress['step'])

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically into the run's folder (main rank; every rank sends its RNG state)."""
        rng_states = gather_objects(self._dist, ckpt.get_rng_state())
        self._progress['replica_difference'] = max_replica_difference(self._dist, self.model.parameters())
        if not self._dist.is_main:
            return
        path = experiment_singleton().run.checkpoint_path / ckpt.CHECKPOINT_NAME
        with monit.section('Save checkpoint'):
            ckpt.save_atomic(self.state(rng_states), path)
        logger.log([('Checkpoint: ', Text.subtle), (str(path), Text.meta)])


def check_int(key: str, value: Any, minimum: int) -> None:
    """A `ValueError` naming config `key` unless `value` is an int `>= minimum`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key} must be an int >= {minimum}, got {value!r}")


@torch.no_grad()
def greedy_continuation(model: nn.Module, prompt: torch.Tensor, n_tokens: int) -> List[int]:
    """
    Continue the 1-D token tensor `prompt` greedily by `n_tokens` tokens, feeding one token at a time through the
    model's state (a key/value or memory cache), so each new token costs one step and not a re-run of the prefix.
    For models without a `generate()` of their own.
    """
    logits, state = model(prompt[:, None], return_state=True)
    out = []
    for _ in range(n_tokens):
        # `[1, 1]`: the most likely next token
        token = logits[-1].argmax(dim=-1, keepdim=True)
        out.append(int(token.item()))
        logits, state = model(token, state=state, return_state=True)
    return out


@option(NLPAutoRegressionConfigs.device)
def _device(c: NLPAutoRegressionConfigs) -> torch.device:
    if c.use_cuda and torch.cuda.is_available():
        return torch.device('cuda', c._dist.local_rank)
    return torch.device('cpu')


@option(NLPAutoRegressionConfigs.tokenizer, 'character')
def _character_tokenizer(c: NLPAutoRegressionConfigs) -> Callable:
    return character_tokenizer


@option(NLPAutoRegressionConfigs.text)
def _tiny_shakespeare(c: NLPAutoRegressionConfigs) -> TextDataset:
    from labml import lab
    path = resolve_text_path(c.text_path, lab.get_data_path())
    return TextFileDataset(path, c.tokenizer)


@option(NLPAutoRegressionConfigs.n_tokens)
def _n_tokens(c: NLPAutoRegressionConfigs) -> int:
    return c.text.n_tokens


@option(NLPAutoRegressionConfigs.loss_func)
def _cross_entropy(c: NLPAutoRegressionConfigs) -> nn.Module:
    return nn.CrossEntropyLoss()


@option(NLPAutoRegressionConfigs.optimizer)
def _optimizer(c: NLPAutoRegressionConfigs) -> OptimizerConfigs:
    conf = OptimizerConfigs()
    conf.parameters = c.model.parameters()
    conf.d_model = getattr(c, 'd_model', 512)
    for key, value in c._optimizer_defaults.items():
        setattr(conf, key, value)
    return conf


def shuffled_batches(c: NLPAutoRegressionConfigs, text: str, is_train: bool) -> SequenceBatches:
    """Shuffled sequences of `text` (with random offsets for training), this rank's rows of every batch."""
    return SequenceBatches(c.text.text_to_i(text), seq_len=c.seq_len, batch_size=c.batch_size, shuffle=True,
                           random_offset=is_train, seed=c.seed if is_train else c.seed + 1,
                           rank=c._dist.rank, world_size=c._dist.world_size)


@option(NLPAutoRegressionConfigs.train_loader)
def _train_loader(c: NLPAutoRegressionConfigs) -> SequenceBatches:
    return c.make_loader(c.text.train, True)


@option(NLPAutoRegressionConfigs.valid_loader)
def _valid_loader(c: NLPAutoRegressionConfigs) -> SequenceBatches:
    return c.make_loader(c.text.valid, False)
