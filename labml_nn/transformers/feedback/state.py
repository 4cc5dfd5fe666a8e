r"""
---
title: Feedback Transformer state
summary: What a Feedback Transformer carries from one call to the next (the cached keys and values of its memory),
  the layout of that cache, and how a state is cut from the graph and saved in a checkpoint.
---

# State

A Feedback Transformer reads the past only through the keys and values of its memory vectors, so those
(and how many steps there were) are everything a later call needs to continue a sequence:

```python
out, state = transformer(x[:10], return_state=True)
out2, state = transformer(x[10:], state=state, return_state=True)   # same as transformer(x)[10:]
```

<a id="layout"></a>

## The cache layout

This is the one description of the cache; every other page links here. One entry per step holds the keys and
values of that step's memory vector $m_t$ for every **group** of layers that projects the memory itself,

$$\text{entry}_t : \; [\text{groups}, 2, \text{batch\_size}, \text{heads}, d_k],$$

where `groups` is $L$ for `FeedbackTransformer` (each layer $l$ has its own $W_k^l, W_v^l$) and 1 for
`FeedbackTransformerKV` (one projection shared by all layers), and index 0 of the second axis holds keys,
1 values. Entries are stacked on **axis 4**, so the cache reads

$$[\text{groups}, 2, \text{batch\_size}, \text{heads}, \text{time}, d_k]:$$

the keys of one head form one contiguous `[time, d_k]` matrix, the layout batched matrix products read
fastest. The module loop keeps the cache in a `Stack` ([stack.py](stack.html)); the fused loop
([fused.py](fused.html)) writes the same layout into a work buffer of its own.

## Memory span

With a memory span $S$, step $t$ attends to slots $\max(0, t - S) \dots t - 1$ only
([`first_visible`](stack.html#first_visible), the one definition of the rule). The state then keeps just those
$S$ entries, so a long generation or memory carried over many batches costs the same at its end as at its start.

## Cutting and branching

`detach()` returns a state whose cached keys and values are constants for autograd: gradients of a later
call stop there, as in truncated backpropagation through time. It shares the cached tensors, without a copy.

A state can be continued twice (for example to sample two continuations of one prompt) when no gradient
flows into its cache: under `torch.no_grad()`, or after `detach()`. Continuing a state twice while
gradients would flow into it raises an error, because the two continuations would share one gradient
buffer.

## Saving a state

Memory carried across training batches is part of a training checkpoint. `to_payload()` turns a state into plain
tensors and numbers (so checkpoints still load with `torch.load(..., weights_only=True)`), and the transformer's
`state_from_payload()` turns them back into a state, with the transformer's own memory span.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from labml_nn.transformers.feedback.stack import Stack


@dataclass
class FeedbackState:
    """
    * `kv`: the cache, a `Stack` of entries `[groups, 2, batch_size, heads, d_k]` stacked on axis 4
    * `n_steps`: how many steps (tokens) the state has seen
    * `visible`: the keys and values the next step attends to, `[groups, 2, batch_size, heads, n_visible, d_k]`
      (a view into `kv`, carrying the autograd history unless detached)
    """
    kv: Stack
    n_steps: int
    visible: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.visible.shape[2]

    @property
    def memory_span(self) -> Optional[int]:
        """The memory span of the model that made this state (`None`: unlimited)."""
        return self.kv.memory_span

    def detach(self) -> "FeedbackState":
        """The same state with its cache cut from the autograd graph (no copy)."""
        kv = self.kv.fork(self.n_steps, self.visible)
        return FeedbackState(kv, self.n_steps, kv.get())

    def stack_for_continuation(self) -> Stack:
        """
        The stack to append the next steps to: this state's own, or a fork of it when the stack has already
        grown past this state (the state was continued before).
        """
        if self.kv.length == self.n_steps:
            return self.kv
        if self.kv.requires_grad and self.kv.frozen < self.n_steps and torch.is_grad_enabled():
            raise ValueError("state was already continued by an earlier call; continuing it again would "
                             "mix two graphs' gradients. Use state.detach() (or torch.no_grad()) to branch "
                             "from a state.")
        return self.kv.fork(self.n_steps, self.visible)

    @staticmethod
    def from_cache(visible: torch.Tensor, n_steps: int, memory_span: Optional[int]) -> "FeedbackState":
        r"""
        The state after step `n_steps - 1` from the visible part of a cache, `visible`
        `[groups, 2, batch_size, heads, n, d_k]` (the keys and values of steps `n_steps - n ... n_steps - 1`, any
        strides, no copy). Gradients flow through `visible` itself: the fused loop returns its state so.
        """
        stack = Stack.from_rows(visible, n_steps - visible.shape[4], memory_span=memory_span, dim=4)
        return FeedbackState(stack, n_steps, visible)

    def to_payload(self) -> Dict[str, Any]:
        """The state as plain tensors and numbers, for a `weights_only` checkpoint (a copy, on the CPU)."""
        return {'kind': 'feedback', 'n_steps': self.n_steps, 'visible': self.visible.detach().cpu().clone()}

    @staticmethod
    def from_payload(payload: Dict[str, Any], device: torch.device,
                     memory_span: Optional[int]) -> "FeedbackState":
        """The state that `to_payload` saved, on `device`, continued by a model with `memory_span`."""
        # Checkpoints written before `to_payload` existed hold the same fields (and the time axis, always 4)
        if payload.get('kind', 'feedback') != 'feedback' or int(payload.get('dim', 4)) != 4:
            raise ValueError("the carried state in the checkpoint is not a Feedback Transformer's")
        visible = payload['visible'].to(device)
        n = visible.shape[4]
        if memory_span is not None and n > memory_span:
            raise ValueError(f"the carried state holds {n} memory vectors, more than this model's "
                             f"memory_span={memory_span}")
        return FeedbackState.from_cache(visible, int(payload['n_steps']), memory_span)
