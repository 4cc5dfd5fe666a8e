r"""
---
title: Feedback Transformer state
summary: What a Feedback Transformer carries from one call to the next, to continue a sequence.
---

# State

A Feedback Transformer reads the past only through the keys and values of its memory vectors, so those
(and how many steps there were) are everything a later call needs to continue a sequence:

```python
out, state = transformer(x[:10], return_state=True)
out2, state = transformer(x[10:], state=state, return_state=True)   # same as transformer(x)[10:]
```

The keys and values live in a `Stack` with entries `[groups, 2, batch_size, heads, d_k]`: `groups` is the
number of layers for `FeedbackTransformer` (each layer projects the memory itself) and 1 for
`FeedbackTransformerKV` (one shared projection); index 0 of the second axis holds keys, 1 values. Entries are
stacked on axis 4, so the cache reads `[groups, 2, batch_size, heads, time, d_k]`: each head's keys are one
contiguous matrix.

`detach()` returns a state whose cached keys and values are constants for autograd: gradients of a later
call stop there, as in truncated backpropagation through time. It shares the cached tensors, without a copy.

A state can be continued twice (for example to sample two continuations of one prompt) when no gradient
flows into its cache: under `torch.no_grad()`, or after `detach()`. Continuing a state twice while
gradients would flow into it raises an error, because the two continuations would share one gradient
buffer.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from labml_nn.transformers.feedback.stack import Stack


@dataclass
class FeedbackState:
    """
    * `kv`: the cached keys and values, entries `[groups, 2, batch_size, heads, d_k]`
    * `n_steps`: how many steps (tokens) the state has seen
    * `visible`: the keys and values the next step attends to, `[groups, 2, batch_size, heads, n_visible, d_k]`
      (a view into `kv`, carrying the autograd history unless detached); `None` before the first step
    """
    kv: Stack
    n_steps: int
    visible: Optional[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.visible.shape[2]

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
            raise ValueError("state was already continued by an earlier call; continuing it again would mix two "
                             "graphs' gradients. Use state.detach() (or torch.no_grad()) to branch from a state.")
        return self.kv.fork(self.n_steps, self.visible)
