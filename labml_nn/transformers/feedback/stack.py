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

## Windows and frozen rows

Two extensions serve the rest of the model:

* `window`: attend only to the last `window` entries (the paper's limited memory span). Rows older than the
  window are dropped when the buffer is reallocated, so memory stays $O(\text{window})$ during generation.
* `frozen`: rows below this index are constants (a state that was `detach()`ed); no gradient is
  accumulated for them.
"""

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable


class StackFunction(torch.autograd.Function):
    r"""
    Append `value` as entry `n` of `stack` and return a zero-copy view of the stack's visible entries,
    `[n_visible, *entry_shape]` where the last row is `value`.

    Forward: `data[n] = value`. Backward: add the view's gradient to the shared gradient buffer and return
    the completed gradient of entry $n$.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, stack: "Stack", n: int) -> torch.Tensor:
        start = stack._write(n, value)
        ctx.stack = stack
        ctx.n = n
        ctx.start = start
        return stack._alias(start, n + 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_view: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        stack: Stack = ctx.stack
        n, start = ctx.n, ctx.start
        # The gradient buffer for this backward pass, rows indexed from `stack.frozen`
        grad = stack._grad_buffer(grad_view)
        # Rows below `frozen` are constants: no gradient goes to them
        lo = max(start, stack.frozen)
        # Every visible row $j \le n$ collects this view's gradient
        grad[lo - stack.frozen:n + 1 - stack.frozen] += grad_view[lo - start:]
        # Row $n$ is complete now: all later views have been through here already
        grad_n = grad[n - stack.frozen].clone()
        # The last row of a pass frees the buffer
        if n == stack.frozen:
            stack._grad = None
        return grad_n, None, None


class Stack:
    r"""
    An append-only stack of equally shaped tensors (one per step), growing without a fixed capacity.

    * `max_len` is a capacity hint: the buffer starts with room for that many entries and grows
      (doubling) when needed.
    * `window`, if given, is how many of the latest entries each view shows (the memory span).

    `append(n, value)` must be called with `n = 0, 1, 2, ...` in order; it returns the view of the visible
    entries and keeps it for `get()`.
    """

    def __init__(self, max_len: int = 0, *, window: Optional[int] = None):
        if not isinstance(max_len, int) or max_len < 0:
            raise ValueError(f"max_len must be an int >= 0, got {max_len!r}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
        self.capacity_hint = max_len
        self.window = window
        # Number of entries appended so far (absolute index of the next entry)
        self.length = 0
        # Entries `< frozen` are constants for gradients (see `fork`)
        self.frozen = 0
        # Whether any appended entry carries autograd history
        self.requires_grad = False
        # The buffer, shared with forks: a `_Buffer` holding rows `[buffer.first, buffer.end)`
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
            # No gradient to track: skip the autograd node, same data
            with torch.no_grad():
                self._last = StackFunction.forward(_NoCtx(), value.detach(), self, n)
        return self._last

    def get(self) -> Optional[torch.Tensor]:
        """The view returned by the last `append`, `[n_visible, *entry_shape]`, or `None` if empty."""
        return self._last

    def free(self) -> None:
        """Drop the buffers; the stack starts empty again (views already handed out stay valid)."""
        self.__init__(self.capacity_hint, window=self.window)

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
        other = Stack(self.capacity_hint, window=self.window)
        other.length = other.frozen = n
        if n == 0:
            return other
        start = self._visible_start(n - 1)
        if self._buffer.first <= start:
            other._buffer = self._buffer
        elif visible is not None and visible.shape[0] == n - start:
            other._buffer = _Buffer(visible.detach(), first=start, end=n)
        else:
            raise ValueError(f"fork: the entries visible from entry {n - 1} are no longer stored; "
                             f"pass the view of that step as `visible`")
        other._last = other._alias(start, n)
        return other

    @staticmethod
    def from_rows(rows: torch.Tensor, first: int, *, window: Optional[int] = None) -> "Stack":
        r"""
        A stack whose entries `first, first + 1, ...` are `rows` (`[n, *entry_shape]`, any strides, no copy), all
        constants for autograd: their gradients flow through `rows` itself. The fused loop returns its cache so.
        """
        stack = Stack(window=window)
        end = first + rows.shape[0]
        stack.length = stack.frozen = end
        stack._buffer = _Buffer(rows.detach(), first=first, end=end)
        stack._last = stack._alias(stack._visible_start(end - 1), end)
        return stack

    @property
    def shape(self) -> Optional[torch.Size]:
        """Shape of one entry, once known."""
        return None if self._buffer is None else self._buffer.data.shape[1:]

    def _visible_start(self, n: int) -> int:
        # First entry visible from entry `n`: all of them, or the last `window`
        return 0 if self.window is None else max(0, n + 1 - self.window)

    def _write(self, n: int, value: torch.Tensor) -> int:
        # Called by `StackFunction.forward`: store `value` as entry `n`; returns the first visible index
        if n != self.length:
            raise ValueError(f"Stack: entries must be appended in order: expected n={self.length}, got n={n}")
        buf = self._buffer
        if buf is not None and (value.shape != buf.data.shape[1:] or value.dtype != buf.data.dtype
                                or value.device != buf.data.device):
            raise ValueError(f"Stack entries must all have the same shape, dtype and device: the stack holds "
                             f"{tuple(buf.data.shape[1:])} {buf.data.dtype} on {buf.data.device}, got "
                             f"{tuple(value.shape)} {value.dtype} on {value.device}")
        start = self._visible_start(n)
        # A new buffer when there is none, it is full, or a fork has written past our end (copy on write)
        if buf is None or n >= buf.first + buf.data.shape[0] or buf.end != n:
            self._buffer = _Buffer.grow(buf, value, first=start, end=n, hint=self.capacity_hint,
                                        window=self.window)
            buf = self._buffer
        buf.data[n - buf.first] = value
        buf.end = n + 1
        self.length = n + 1
        return start

    def _alias(self, start: int, stop: int) -> torch.Tensor:
        # Rows `[start, stop)` as a separate tensor over the buffer's memory (own version counter, no copy)
        data = self._buffer.data
        row = data.stride(0)
        out = data.new_empty(0)
        out.set_(data.untyped_storage(), data.storage_offset() + (start - self._buffer.first) * row,
                 (stop - start, *data.shape[1:]), data.stride())
        return out

    def _grad_buffer(self, like: torch.Tensor) -> torch.Tensor:
        # Zeros at the start of each backward pass (identified by the autograd engine's graph task id)
        task = torch._C._current_graph_task_id()
        if self._grad is None or task != self._grad_task:
            self._grad = like.new_zeros((self.length - self.frozen, *like.shape[1:]))
            self._grad_task = task
        return self._grad


class _Buffer:
    """Preallocated rows `[first, first + capacity)` of a stack; rows `< end` are written."""

    def __init__(self, data: torch.Tensor, first: int, end: int):
        self.data = data
        self.first = first
        self.end = end

    @staticmethod
    def grow(old: Optional["_Buffer"], value: torch.Tensor, *, first: int, end: int, hint: int,
             window: Optional[int]) -> "_Buffer":
        # Rows worth keeping: `[first, end)`; room for at least as many again (amortised O(1) appends)
        keep = end - first
        capacity = max(2 * keep + 1, hint - first, 16)
        if window is not None:
            capacity = max(min(capacity, 2 * window), keep + 1)
        data = value.new_empty((capacity, *value.shape))
        if keep > 0:
            data[:keep] = old.data[first - old.first:end - old.first]
        return _Buffer(data, first, end)


class _NoCtx:
    """Stand-in for autograd's `ctx` when `StackFunction.forward` runs without autograd."""
