r"""
---
title: Training accelerators of the Feedback Transformer paper
summary: Memory carried across batches (truncated backpropagation through time) over contiguous streams, and a
  sequence-length curriculum, as options of the autoregressive training loop.
---

# Training accelerators

A Feedback Transformer runs its steps one after the other, so the length of a training sequence is the length
of a loop that no batch can parallelize. The paper makes training practical with a few tricks; two of them
change the training loop and live here (the memory span is a keyword of the model, initialization from a
parallel transformer is in `transformers/feedback/init_from.py`).

## Memory carried across batches

With `carry_memory=True` the training text is cut into `batch_size` **contiguous streams**, one per batch row,

$$\text{stream}_r = x_{rL} \dots x_{(r+1)L}, \qquad L = \Big\lfloor \frac{N - 1}{\text{batch\_size}} \Big\rfloor,$$

and batch $i$ holds segment $i$ of every stream: tokens $rL + i\,T \dots rL + (i+1)\,T$ for $T$ = `seq_len`.
The model's state after batch $i$ (the cached keys and values of the memory) is the start of batch $i+1$,

$$\text{logits}_i, s_i = \text{model}(x_i, \text{state} = \mathrm{detach}(s_{i-1})),$$

so every step sees the memory of the previous segments but gradients stop at the segment boundary: truncated
backpropagation through time. The memory span bounds what is carried (the last `memory_span` memory vectors),
so `carry_memory` needs one. The state starts empty at every epoch; validation reads the validation text as
streams the same way, with its own state, starting empty at each validation.

A checkpoint stores every rank's carried state, so `resume=` continues a run exactly where it stopped (with the
same number of processes; with another number the memory restarts empty at the next segment).

This loop reaches the model only through a small interface, so any transformer that offers it can carry memory:
`model(x, state=..., return_state=True)`, `state.detach()`, `state.to_payload()` (plain tensors for a checkpoint)
and `model.transformer.state_from_payload(payload, device)`. For the Feedback Transformers these live in
[state.py](../transformers/feedback/state.html).

## Sequence-length curriculum

`seq_len_curriculum="16:0,32:0.25,64:0.5"` trains on segments of 16 tokens for the first quarter of the
optimizer steps, then 32, and `seq_len` = 64 from half-way on. A stage of length $s$ cuts each batch
`[seq_len, batch_size]` into `seq_len / s` consecutive pieces and trains on them as one batch
`[s, batch_size * seq_len / s]`: the same tokens, the same steps and the same schedule, but the sequential loop
is `seq_len / s` times shorter and each of its steps is wider, which is what the feedback model runs fast on.
Validation always uses the full `seq_len`. The stage is a function of the step alone, so resuming is exact.

`validate_at_start=True` validates on the whole validation set before the first step as well, which is how the
README measures an initialization (`init_from`).
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
from labml import tracker
from labml.logger import Text

from labml_nn.experiments.distributed import gather_objects
from labml_nn.experiments.nlp_autoregression import NLPAutoRegressionConfigs
from labml_nn.experiments.text_data import SequenceBatches, check_batch_args


class ContiguousStreams:
    """
    Batches for memory carried across batches: row `r` of batch `i` is segment `i` of stream `r`.

    * `data`: the whole text as token ids, `[n_tokens]`
    * `batch_size`: the *global* batch (number of streams); rank `r` of `world_size` gets rows
      `r * batch_size / world_size ... (r + 1) * batch_size / world_size - 1`, its own streams

    Batches are `(data, target)`, both `[seq_len, batch_size / world_size]`; the same in every epoch.
    """

    def __init__(self, data: torch.Tensor, *, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        check_batch_args(data, seq_len, batch_size, world_size)
        self.data = data
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        # $L$: tokens per stream (its last one is only a target)
        self.stream_len = (data.shape[0] - 1) // batch_size
        if len(self) == 0:
            raise ValueError(f"The text ({data.shape[0]:,} tokens) is too short for {batch_size} "
                             f"contiguous streams of at least seq_len={seq_len} tokens each")
        # The first token of this rank's streams, `[local_batch_size]`
        first = rank * self.local_batch_size
        self.starts = torch.arange(first, first + self.local_batch_size) * self.stream_len
        self._arange = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return self.stream_len // self.seq_len

    def batch(self, epoch: int, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Segment `idx` of this rank's streams: `(data, target)`, each `[seq_len, local_batch_size]`."""
        starts = self.starts + idx * self.seq_len
        seqs = self.data[starts[None, :] + self._arange[:, None]]
        return seqs[:-1], seqs[1:]

    # Batches `start .. end - 1` as `(idx, data, target)`; `epoch` changes nothing (the streams are fixed)
    iterate = SequenceBatches.iterate


def parse_curriculum(spec: str, seq_len: int) -> List[Tuple[int, float]]:
    """
    `"16:0,32:0.25,64:0.5"` to `[(16, 0.0), (32, 0.25), (64, 0.5)]`: (segment length, fraction of the training
    steps where the stage starts). A `ValueError` names what is wrong.
    """
    stages: List[Tuple[int, float]] = []
    for part in spec.split(','):
        length, sep, start = part.strip().partition(':')
        try:
            stage = (int(length), float(start))
        except ValueError:
            stage = None
        if not sep or stage is None:
            raise ValueError(f"seq_len_curriculum={spec!r}: stages are length:start_fraction separated by "
                             f"commas (e.g. 16:0,32:0.25,{seq_len}:0.5), got {part!r}")
        length_, start_ = stage
        if not 1 <= length_ <= seq_len:
            raise ValueError(f"seq_len_curriculum={spec!r}: stage length {length_} must be in "
                             f"[1, seq_len={seq_len}]")
        if seq_len % length_ != 0:
            raise ValueError(f"seq_len_curriculum={spec!r}: stage length {length_} must divide "
                             f"seq_len={seq_len} (each batch is cut into seq_len / length pieces)")
        if not 0.0 <= start_ < 1.0 or (stages and start_ <= stages[-1][1]):
            raise ValueError(f"seq_len_curriculum={spec!r}: start fractions must increase, in [0, 1), "
                             f"got {start_}")
        stages.append(stage)
    if stages[0][1] != 0.0:
        raise ValueError(f"seq_len_curriculum={spec!r}: the first stage must start at 0")
    return stages


def fold_sequences(x: torch.Tensor, length: int) -> torch.Tensor:
    """
    Cut `[seq_len, batch_size]` into `seq_len / length` consecutive pieces side by side:
    `[length, (seq_len / length) * batch_size]`, piece `k` of row `b` in column `k * batch_size + b`.
    """
    seq_len, batch_size = x.shape
    return x.view(seq_len // length, length, batch_size).transpose(0, 1).reshape(length, -1)


class AcceleratedConfigs(NLPAutoRegressionConfigs):
    """
    The training loop with memory carried across batches and a sequence-length curriculum.
    The model must take `state=` / `return_state=` (as `AutoregressiveModel` does) for `carry_memory`.
    """
    # Train and validate on contiguous streams, carrying the detached state from batch to batch
    carry_memory: bool = False
    # `length:start_fraction,...` stages of training segment lengths ('' for none)
    seq_len_curriculum: str = ''
    # Validate on the whole validation set before the first step too (the figure of an initialization)
    validate_at_start: bool = False

    def validate(self) -> None:
        super().validate()
        if self.seq_len_curriculum:
            parse_curriculum(self.seq_len_curriculum, self.seq_len)
            if self.carry_memory:
                raise ValueError("seq_len_curriculum cannot be combined with carry_memory=True (a curriculum "
                                 "cuts the contiguous segments that the memory is carried along)")

    def init(self) -> None:
        self._carried: Dict[str, Any] = {'train': None, 'valid': None}
        self._stages = (parse_curriculum(self.seq_len_curriculum, self.seq_len)
                        if self.seq_len_curriculum else [])
        self._stage_length = self.seq_len
        super().init()

    # ## Curriculum

    def curriculum_length(self, step: int) -> int:
        """The training segment length at optimizer step `step` (counting from 0)."""
        length = self.seq_len
        for stage_length, start in self._stages:
            if step >= start * self.total_steps():
                length = stage_length
        return length

    def train_step(self, data: torch.Tensor, target: torch.Tensor) -> float:
        if self._stages:
            length = self.curriculum_length(self._progress['step'])
            if length != self._stage_length:
                self.log([('Curriculum: ', Text.key), (f'seq_len {length}', Text.value),
                          (f" from step {self._progress['step']:,}", Text.subtle)])
                self._stage_length = length
            tracker.add('seq_len.train', length)
            if length < data.shape[0]:
                data, target = fold_sequences(data, length), fold_sequences(target, length)
        return super().train_step(data, target)

    # ## Memory carried across batches

    def model_output(self, data: torch.Tensor) -> torch.Tensor:
        if not self.carry_memory:
            return super().model_output(data)
        key = 'train' if self._ddp_model.training else 'valid'
        output, state = self._ddp_model(data, state=self._carried[key], return_state=True)
        # Cut the graph: the next batch starts from this memory, its gradients stop here
        self._carried[key] = state.detach()
        return output

    def train_part(self, epoch: int, end: int) -> Optional[str]:
        if self.validate_at_start and self._progress['step'] == 0 and not self._history['evaluations']:
            self.full_validation()
        if self._progress['batch'] == 0:
            # Every epoch reads the streams from their start, with an empty memory
            self._carried['train'] = None
        return super().train_part(epoch, end)

    def evaluate(self, start: int, end: int, loader: Optional[Any] = None) -> Tuple[float, float]:
        # Validation reads its streams from batch `start` with an empty memory
        self._carried['valid'] = None
        try:
            return super().evaluate(start, end, loader)
        finally:
            self._carried['valid'] = None

    def make_loader(self, text: str, is_train: bool) -> Any:
        """Contiguous streams with `carry_memory`, else the shuffled batches."""
        if not self.carry_memory:
            return super().make_loader(text, is_train)
        return ContiguousStreams(self.text.text_to_i(text), seq_len=self.seq_len, batch_size=self.batch_size,
                                 rank=self._dist.rank, world_size=self._dist.world_size)

    # ## Checkpoints: the carried memory of every rank

    def save_checkpoint(self) -> bool:
        state = self._carried['train'] if self.carry_memory else None
        self._carried_on_ranks = gather_objects(self._dist, None if state is None else state.to_payload())
        return super().save_checkpoint()

    def state(self, rng_states: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {**super().state(rng_states), 'carried': self._carried_on_ranks}

    def load_state(self, payload: Dict[str, Any]) -> None:
        super().load_state(payload)
        carried = payload.get('carried') or []
        if not self.carry_memory or self._progress['batch'] == 0:
            return
        if len(carried) == self._dist.world_size and carried[self._dist.rank] is not None:
            self._carried['train'] = self.model.transformer.state_from_payload(carried[self._dist.rank],
                                                                               self.device)
        else:
            self.log('The checkpoint has no carried memory for this rank: the memory restarts empty at the '
                     'next segment', Text.warning)
