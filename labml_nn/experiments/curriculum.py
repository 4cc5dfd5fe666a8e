r"""
---
title: A sequence-length curriculum
summary: Train on short segments first and the full length later - the same tokens, steps and schedule, with a
  shorter sequential loop - as an object the trainer owns.
---

# Sequence-length curriculum

A Feedback Transformer's training loop is as long as its training sequence: no batch parallelizes it. The paper
trains on short sequences first. `seq_len_curriculum="16:0,32:0.25,64:0.5"` trains on segments of 16 tokens for
the first quarter of the optimizer steps, then 32, and `seq_len` = 64 from half-way on. A stage of length $s$ cuts
each batch `[seq_len, batch_size]` into `seq_len / s` consecutive pieces and trains on them as one batch
`[s, batch_size * seq_len / s]`: the same tokens, the same steps and the same schedule, but the sequential loop is
`seq_len / s` times shorter and each of its steps is wider, which is what the feedback model runs fast on.
Validation always uses the full `seq_len`. The stage is a function of the step alone, so resuming is exact. A
curriculum cuts the segments that memory carried across batches runs along, so the two do not combine.
"""

from typing import List, Tuple

import torch


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


class SeqLenCurriculum:
    """
    The stages of `spec` (`''`: none, always `seq_len`) over a run of `total_steps` optimizer steps.
    """

    def __init__(self, spec: str, seq_len: int, total_steps: int):
        self.stages = parse_curriculum(spec, seq_len) if spec else []
        self.seq_len = seq_len
        self.total_steps = total_steps

    def length(self, step: int) -> int:
        """The training segment length at optimizer step `step` (counting from 0)."""
        length = self.seq_len
        for stage_length, start in self.stages:
            if step >= start * self.total_steps:
                length = stage_length
        return length

    def fold(self, step: int, data: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A training batch as the stage of `step` trains on it."""
        length = self.length(step)
        if length >= data.shape[0]:
            return data, target
        return fold_sequences(data, length), fold_sequences(target, length)
