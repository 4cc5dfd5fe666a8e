r"""
---
title: Memory carried across batches
summary: Truncated backpropagation through time over contiguous streams - the model's state after one batch is the
  start of the next, detached - as an object the trainer owns.
---

# Memory carried across batches

A Feedback Transformer runs its steps one after the other, so the length of a training sequence is the length of
a loop that no batch can parallelize. The paper makes long contexts affordable by carrying the memory across
batches: with `carry_memory=True` the task reads its data as **contiguous streams**, one per batch row (for the
text, [`ContiguousStreams`](../tasks/text.html); for the programs of the state-tracking task, its streams), so that
batch $i + 1$ continues where batch $i$ ended, and the model's state after batch $i$ (the cached keys and values of
the memory) is the start of batch $i+1$,

$$\text{logits}_i, s_i = \text{model}(x_i, \text{state} = \mathrm{detach}(s_{i-1})).$$

Every step sees the memory of the previous segments, but gradients stop at the segment boundary: truncated
backpropagation through time. The memory span bounds what is carried (the last `memory_span` memory vectors), so
`carry_memory` needs one. The state starts empty at every epoch; validation reads its streams the same way, with
its own state, starting empty at every evaluation.

A checkpoint stores every rank's carried state, so `resume=` continues a run exactly where it stopped (with the
same number of processes; with another number the memory restarts empty at the next segment).

This object reaches the model only through a small interface, so any transformer that offers it can carry memory:
`model(x, state=..., return_state=True)`, `state.detach()`, `state.to_payload()` (plain tensors for a checkpoint)
and `model.transformer.state_from_payload(payload, device)`. For the Feedback Transformers these live in
[state.py](../transformers/feedback/state.html); the parallel baseline's state is its key/value cache.
"""

from typing import Any, Dict, List, Optional

import torch


class CarriedMemory:
    """
    The states carried from batch to batch: one for training and one for evaluation (`'train'`, `'valid'`).
    Without `enabled` it is a plain call of the model.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.states: Dict[str, Any] = {'train': None, 'valid': None}

    def forward(self, model: torch.nn.Module, data: torch.Tensor, key: str) -> torch.Tensor:
        """The model's logits for `data`, continuing (and then keeping) the carried state `key`."""
        if not self.enabled:
            return model(data)
        output, state = model(data, state=self.states[key], return_state=True)
        # Cut the graph: the next batch starts from this memory, its gradients stop here
        self.states[key] = state.detach()
        return output

    def reset(self, key: str) -> None:
        """Start `key`'s state empty (a new epoch, a new evaluation)."""
        self.states[key] = None

    def payload(self) -> Optional[Dict[str, Any]]:
        """The training state as plain tensors for a checkpoint (`None` when there is none)."""
        state = self.states['train'] if self.enabled else None
        return None if state is None else state.to_payload()

    def load(self, carried: List[Optional[Dict[str, Any]]], rank: int, world_size: int,
             transformer: torch.nn.Module, device: torch.device) -> bool:
        """
        Restore this rank's training state from a checkpoint's `carried` (one payload per rank). Returns `False` when
        the checkpoint has none for this rank (none carried, or written by another number of processes).
        """
        if len(carried) != world_size or carried[rank] is None:
            return False
        self.states['train'] = transformer.state_from_payload(carried[rank], device)
        return True
