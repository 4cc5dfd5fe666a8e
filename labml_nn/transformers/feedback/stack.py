r"""
---
title: A growing stack of keys and values, without copies
summary: A custom autograd function that appends one step's keys and values to a preallocated buffer and hands
  attention a zero-copy view of everything so far; gradients of all views meet in one shared buffer.
---

# Stacking cached keys and values

At step $t$ the Feedback Transformer attends over the keys and values of every earlier memory vector,
$k_0 \dots k_{t-1}$. They never change once made, so we compute each one once and append it.
The obvious code, `torch.stack(keys)` at every step, copies the whole history each time: $O(T^2)$ memory
traffic in the forward pass, and autograd keeps all $T$ stacked copies alive for the backward pass,
$O(T^2)$ memory.

`Stack` instead keeps one buffer `data` of shape `[capacity, *entry_shape]` and writes step $n$'s entry
into row $n$. Attention gets a *view* of rows $0 \dots n$: no copy. Two things need care.

**Version counters.** PyTorch refuses to backpropagate through a tensor that was modified in place after
autograd saved it, and views share the version counter of their base. Writing row $n+1$ would therefore
invalidate the view of rows $0 \dots n$ that attention saved, although the rows it sees never change.
We hand out views that alias the buffer's storage but are separate tensors with their own counter
(`Tensor.set_`). The rule that makes this safe is the stack's own: a row, once written, is never
written again; when the buffer is full we allocate a larger one and keep the old one for the views
that still point into it.

**Gradients.** The view made at step $n$ receives a gradient for every row $0 \dots n$. Row $j$ therefore
collects gradients from the views of steps $j, j+1, \dots$, and only then can it be passed on to the
value appended at step $j$. The autograd engine runs the backward of step $n+1$ before that of step $n$
(step $n+1$'s appended value depends, through the attention at step $n+1$, on the view of step $n$),
so a single shared gradient buffer suffices: the backward of step $n$ adds its incoming gradient to
rows $0 \dots n$, by then row $n$ is complete, and it is returned as the gradient of the value appended
at step $n$.

The shared gradient buffer is reset at the start of every backward pass (each pass of the autograd engine
has its own id), so running backward twice over a retained graph gives the same gradients twice.

## Memory span and frozen rows

Two extensions serve the rest of the model:

* `memory_span` $S$: each view shows only the last $S$ entries (the paper's limited memory span), by the rule
  of `first_visible` below, the one place that defines it. Rows older than that are dropped when the buffer is
  reallocated, so memory stays $O(S)$ during generation.
* `frozen`: rows below this index are constants (a state that was `detach()`ed); no gradient is
  accumulated for them.

## Where time goes in the buffer

Entries are stacked along axis `dim` of the buffer (0 by default). The Feedback Transformers stack their
cache entries on axis 4 ([the cache layout](state.html)).
"""

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from labml_nn.utils import check_memory_span


def first_visible(step: int, memory_span: Optional[int]) -> int:
    r"""
    The first memory slot that step `step` attends to: step $t$ sees slots $\max(0, t - S) \dots t - 1$ with a
    memory span $S$, and all of $0 \dots t - 1$ without one (`None`). Every part of the model (this stack, the
    module loop, the fused loop and the state) takes the rule from here.
    """
    return 0 if memory_span is None else max(0, step - memory_span)


def n_visible(step: int, memory_span: Optional[int]) -> int:
    """How many memory slots step `step` attends to."""
    return step - first_visible(step, memory_span)


class StackFunction(torch.autograd.Function):
    r"""
    Append `value` as entry `n` of `stack` and return a zero-copy view of the stack's visible entries
    (stacked on the stack's axis `dim`), whose last entry is `value`.

    Forward: write entry $n$. Backward: add the view's gradient to the shared gradient buffer and return
    the completed gradient of entry $n$.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, stack: "Stack", n: int) -> torch.Tensor:
        # Write entry $n$ into the buffer (copying `value`: the buffer owns its rows); `start` is the first entry
        # this view shows (older ones are outside the memory span)
        start = stack._write(n, value)
        # The stack is a Python object, not a tensor: it rides on `ctx` as a plain attribute. Nothing is saved with
        # `save_for_backward`: the backward pass needs no tensor of the forward pass, only indices
        ctx.stack = stack
        ctx.n = n
        ctx.start = start
        return stack._alias(start, n + 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_view: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        stack: Stack = ctx.stack
        n, start, dim, frozen = ctx.n, ctx.start, stack.dim, stack.frozen
        # The gradient buffer for this backward pass, entries indexed from `frozen`
        grad = stack._grad_buffer(grad_view)
        # Entries below `frozen` are constants: no gradient goes to them
        lo = max(start, frozen)
        # Every visible entry $j \le n$ collects this view's gradient
        grad.narrow(dim, lo - frozen, n + 1 - lo).add_(grad_view.narrow(dim, lo - start, n + 1 - lo))
        # Entry $n$ is complete now: all later views have been through here already
        grad_n = grad.select(dim, n - frozen).clone()
        # The last entry of a pass frees the buffer
        if n == frozen:
            stack._grad = None
        return grad_n, None, None


class Stack:
    r"""
    An append-only stack of equally shaped tensors (one per step), growing without a fixed capacity.

    * `max_len` is a capacity hint: the buffer starts with room for that many entries and grows
      (doubling) when needed.
    * `memory_span`, if given, is how many of the latest entries each view shows.
    * `dim`: the axis of the buffer (and of the views) along which entries are stacked.

    `append(n, value)` must be called with `n = 0, 1, 2, ...` in order; it returns the view of the visible
    entries and keeps it for `get()`.
    """

    def __init__(self, max_len: int = 0, *, memory_span: Optional[int] = None, dim: int = 0):
        if not isinstance(max_len, int) or max_len < 0:
            raise ValueError(f"max_len must be an int >= 0, got {max_len!r}")
        check_memory_span(memory_span)
        if not isinstance(dim, int) or dim < 0:
            raise ValueError(f"dim must be an int >= 0, got {dim!r}")
        self.capacity_hint = max_len
        self.memory_span = memory_span
        self.dim = dim
        # Number of entries appended so far (absolute index of the next entry)
        self.length = 0
        # Entries `< frozen` are constants for gradients (see `fork`)
        self.frozen = 0
        # Whether any appended entry carries autograd history
        self.requires_grad = False
        # The buffer, shared with forks: a `_Buffer` holding entries `[buffer.first, buffer.end)`
        self._buffer: Optional[_Buffer] = None
        # The gradient buffer of the current backward pass and the id of that pass
        self._grad: Optional[torch.Tensor] = None
        self._grad_task = None
        # The last view returned
        self._last: Optional[torch.Tensor] = None

    def append(self, n: int, value: torch.Tensor) -> torch.Tensor:
        """Append `value` as entry `n` (which must equal the number of entries so far); return the view."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
        if value.requires_grad and torch.is_grad_enabled():
            self.requires_grad = True
            self._last = StackFunction.apply(value, self, n)
        else:
            # No gradient to track (generation, a detached state): the same write and view, without creating an
            # autograd node. `forward` is a plain static method, so it can be called directly; it stores its three
            # attributes on whatever `ctx` it gets, here a throwaway stand-in (`_NoCtx`), since no backward will
            # ever read them
            with torch.no_grad():
                self._last = StackFunction.forward(_NoCtx(), value.detach(), self, n)
        return self._last

    def get(self) -> Optional[torch.Tensor]:
        """The view returned by the last `append`, or `None` if empty."""
        return self._last

    def reserve(self, n_more: int, like: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """
        Make room for `n_more` entries like `like` after the current ones, in one buffer that also holds every
        entry they will see, and that no fork writes to. Returns the buffer and the index of its first entry;
        the caller writes entries without autograd and then calls `extended(n_more)`.
        """
        end = self.length + n_more
        # The first entry the next step sees
        first = self._visible_start(self.length - 1) if self.length > 0 else 0
        buf = self._buffer
        # A new buffer unless the current one holds entry `first` already, has room up to `end`, and no fork has
        # written past our last entry (then its rows after `length` are someone else's)
        capacity = 0 if buf is None else buf.data.shape[self.dim]
        if buf is None or first < buf.first or end > buf.first + capacity or buf.end != self.length:
            self._buffer = _Buffer.grow(buf, like, self.dim, first=first, end=self.length,
                                        capacity=max(2 * (end - first), self.capacity_hint - first, 16))
        return self._buffer.data, self._buffer.first

    def extended(self, n_more: int) -> torch.Tensor:
        """Count `n_more` entries written into the buffer from `reserve`; returns the view of the visible ones."""
        self.length += n_more
        self._buffer.end = self.length
        self._last = self._alias(self._visible_start(self.length - 1), self.length)
        return self._last

    def fork(self, n: Optional[int] = None, visible: Optional[torch.Tensor] = None) -> "Stack":
        r"""
        A new stack holding this stack's first `n` entries (all by default) as constants for autograd.

        It shares this stack's buffer (no copy) while that still holds the entries visible from entry
        $n - 1$; otherwise it starts from `visible`, the view `append(n - 1, ...)` returned. Appending to either
        stack later never overwrites the other's entries: a stack that finds its buffer's tail written by
        someone else moves to a fresh buffer first (copy on write).
        """
        n = self.length if n is None else n
        if not 0 <= n <= self.length:
            raise ValueError(f"fork: n must be in [0, {self.length}], got {n}")
        other = Stack(self.capacity_hint, memory_span=self.memory_span, dim=self.dim)
        # All `n` entries are constants for the fork: its backward passes stop there
        other.length = other.frozen = n
        if n == 0:
            return other
        # The entries the fork's next step sees: `start .. n - 1`
        start = self._visible_start(n - 1)
        if self._buffer.first <= start:
            # Our buffer still holds them: share it (whoever appends first past `n` keeps writing into it; the other
            # finds `buffer.end != length` and copies, in `_write`)
            other._buffer = self._buffer
        elif visible is not None and visible.shape[self.dim] == n - start:
            other._buffer = _Buffer(visible.detach(), first=start, end=n)
        else:
            raise ValueError(f"fork: the entries visible from entry {n - 1} are no longer stored; "
                             f"pass the view of that step as `visible`")
        other._last = other._alias(start, n)
        return other

    @staticmethod
    def from_rows(rows: torch.Tensor, first: int, *, memory_span: Optional[int] = None,
                  dim: int = 0) -> "Stack":
        r"""
        A stack whose entries `first, first + 1, ...` are `rows` (stacked on `dim`, any strides, no copy), all
        constants for autograd: their gradients flow through `rows` itself. The fused loop returns its cache so.
        """
        stack = Stack(memory_span=memory_span, dim=dim)
        end = first + rows.shape[dim]
        # Constants for the stack's own backward (their gradient is autograd's business, through `rows`)
        stack.length = stack.frozen = end
        stack._buffer = _Buffer(rows.detach(), first=first, end=end)
        stack._last = stack._alias(stack._visible_start(end - 1), end)
        return stack

    @property
    def shape(self) -> Optional[torch.Size]:
        """Shape of one entry, once known."""
        if self._buffer is None:
            return None
        shape = list(self._buffer.data.shape)
        del shape[self.dim]
        return torch.Size(shape)

    def _visible_start(self, n: int) -> int:
        # The first entry the view made with entry `n` shows: the entries step `n + 1` attends to
        return first_visible(n + 1, self.memory_span)

    def _write(self, n: int, value: torch.Tensor) -> int:
        # Called by `StackFunction.forward`: store `value` as entry `n`; returns the first visible index
        if n != self.length:
            raise ValueError(f"Stack: entries must be appended in order: expected n={self.length}, got n={n}")
        if value.dim() < self.dim:
            raise ValueError(f"Stack entries need at least {self.dim} dimensions (dim={self.dim}), "
                             f"got shape {tuple(value.shape)}")
        buf = self._buffer
        if buf is not None and (value.shape != self.shape or value.dtype != buf.data.dtype
                                or value.device != buf.data.device):
            raise ValueError(f"Stack entries must all have the same shape, dtype and device: the stack holds "
                             f"{tuple(self.shape)} {buf.data.dtype} on {buf.data.device}, got "
                             f"{tuple(value.shape)} {value.dtype} on {value.device}")
        start = self._visible_start(n)
        # A new buffer when there is none, it is full, or a fork has written past our end (copy on write)
        if buf is None or n >= buf.first + buf.data.shape[self.dim] or buf.end != n:
            # Room for twice what is visible now, so appends cost amortized $O(1)$ copies; with a memory span at
            # most twice the span: the buffer then keeps sliding forward, dropping entries nobody sees any more
            capacity = max(2 * (n - start) + 1, self.capacity_hint - start, 16)
            if self.memory_span is not None:
                capacity = max(min(capacity, 2 * self.memory_span), n - start + 1)
            self._buffer = _Buffer.grow(buf, value, self.dim, first=start, end=n, capacity=capacity)
            buf = self._buffer
        # Row `n - first` of the buffer is entry `n`
        buf.data.select(self.dim, n - buf.first).copy_(value)
        buf.end = n + 1
        self.length = n + 1
        return start

    def _alias(self, start: int, stop: int) -> torch.Tensor:
        # Entries `[start, stop)` as a separate tensor over the buffer's memory (own version counter, no copy)
        data = self._buffer.data
        shape = list(data.shape)
        shape[self.dim] = stop - start
        # `set_` points a fresh tensor (fresh version counter) at the buffer's storage: unlike a view made with
        # `narrow`, later writes to other rows of the buffer do not bump this tensor's version, so autograd keeps
        # accepting it in the backward pass
        out = data.new_empty(0)
        offset = data.storage_offset() + (start - self._buffer.first) * data.stride(self.dim)
        out.set_(data.untyped_storage(), offset, shape, data.stride())
        return out

    def _grad_buffer(self, like: torch.Tensor) -> torch.Tensor:
        # Zeros at the start of each backward pass (identified by the autograd engine's graph task id)
        task = torch._C._current_graph_task_id()
        if self._grad is None or task != self._grad_task:
            # One row per entry that can receive a gradient, `frozen .. length - 1`
            shape = list(like.shape)
            shape[self.dim] = self.length - self.frozen
            self._grad = like.new_zeros(shape)
            self._grad_task = task
        return self._grad


class _Buffer:
    """Preallocated entries `[first, first + capacity)` of a stack; entries `< end` are written."""

    def __init__(self, data: torch.Tensor, first: int, end: int):
        self.data = data
        self.first = first
        self.end = end

    @staticmethod
    def grow(old: Optional["_Buffer"], value: torch.Tensor, dim: int, *, first: int, end: int,
             capacity: int) -> "_Buffer":
        # A new buffer with room for `capacity` entries, keeping entries `[first, end)` of the old one
        shape = list(value.shape)
        shape.insert(dim, capacity)
        # Zeros, not whatever the memory held: rows not written yet must be finite numbers, for
        # [the compiled step](static_step.html) reads the whole buffer (with zero weight on them)
        data = value.new_zeros(shape)
        keep = end - first
        if keep > 0:
            data.narrow(dim, 0, keep).copy_(old.data.narrow(dim, first - old.first, keep))
        return _Buffer(data, first, end)


class _NoCtx:
    """Stand-in for autograd's `ctx` when `StackFunction.forward` runs without autograd."""
