r"""
---
title: The arithmetic floor of a training step
summary: The matrix products of one training step, recorded as they run (forward and backward, same shapes, same
  count) and replayed back to back with nothing else - the fastest this machine could run the step.
---

# The arithmetic floor

A Feedback Transformer step at the README's sizes is mostly *not* arithmetic: the loop dispatches a few dozen
small operations per layer per token, and each costs microseconds of overhead whatever its size. How far a model is
from what the machine can do is the ratio of its speed to the speed of its arithmetic alone.

`record_products` runs one training step (forward, loss, backward, clipping, Adam) under a
`TorchDispatchMode`, below autograd, so it sees every matrix product the step really runs, those of the backward
pass included: `mm`, `addmm`, `bmm`, `baddbmm`, with their operands' shapes, strides and dtypes. The fused
attention kernels of the parallel baseline count as the batched products they contain (two forward, four
backward), in full: a causal kernel may skip the masked half, so that model's floor is if anything too slow.

`replay_seconds` then runs exactly these products back to back on operands made once, writing into outputs made
once (`out=`): no allocation, no Python model code, no other operation. Its time is the **floor** of the step on
this machine, and

$$\text{fraction of floor} = \frac{\text{tokens/s}}{\text{tokens/s at the floor}}
  = \frac{t_\text{floor}}{t_\text{step}}.$$

The element-wise work (norms, softmax, the optimizer) is left out, so the floor is a bound no implementation of
the same products can beat, not a target one can reach. It does include each product's own dispatch from Python
(a few microseconds): thousands of products of a few thousand multiply-adds each cost that much on any
implementation that launches them one by one.
"""

import statistics
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# The products replayed as they are, and the operand positions of each (the rest are scalars: `beta`, `alpha`)
PRODUCTS = {aten.mm.default: 2, aten.addmm.default: 3, aten.bmm.default: 2, aten.baddbmm.default: 3}


class Product(NamedTuple):
    """
    One matrix product of the step: the aten op, its operands' shapes, strides, addresses and dtype, its scalars.
    """
    op: object
    shapes: Tuple[Tuple[int, ...], ...]
    strides: Tuple[Tuple[int, ...], ...]
    dtype: torch.dtype
    kwargs: dict
    # Where each operand's data was (`None`: not a tensor of the step): products that read the same tensor (a
    # weight, step after step) share one operand in the replay, so that it stays in the caches as it does in the step
    addresses: Tuple[Optional[int], ...] = ()

    @property
    def flop(self) -> int:
        r"""$2\, m n k$ (times the batch): the multiply-adds of the product."""
        a, b = self.shapes[-2], self.shapes[-1]
        batch = a[0] if len(a) == 3 else 1
        return 2 * batch * a[-2] * a[-1] * b[-1]


def _attention_products(q: torch.Tensor, k: torch.Tensor, backward: bool) -> List[Product]:
    r"""
    The batched products inside a fused attention kernel over `q [B, H, L, E]`, `k [B, H, S, E]`: forward
    $Q K^\top$ and $P V$; backward $dV = P^\top dO$, $dP = dO\, V^\top$, $dQ = dS\, K$, $dK = dS^\top Q$.
    """
    bh, L, S, E = q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    pairs = [((bh, L, E), (bh, E, S)), ((bh, L, S), (bh, S, E))]
    if backward:
        pairs = [((bh, S, L), (bh, L, E)), ((bh, L, E), (bh, E, S)), ((bh, L, S), (bh, S, E)),
                 ((bh, S, L), (bh, L, E))]
    return [Product(aten.bmm.default, (a, b), (_contiguous(a), _contiguous(b)), q.dtype, {}, (None, None))
            for a, b in pairs]


def _contiguous(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The strides of a contiguous tensor of `shape`."""
    return torch.empty(shape, device='meta').stride()


def _operand(shape: Tuple[int, ...], stride: Tuple[int, ...], device: str, dtype: torch.dtype) -> torch.Tensor:
    """Random values with the recorded shape and strides (transposed, strided or broadcast views alike)."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride) if n > 0)
    return torch.randn(size, device=device, dtype=dtype).as_strided(shape, stride)


class _Recorder(TorchDispatchMode):
    """Notes every matrix product dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.products: List[Product] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            operands = args[:PRODUCTS[func]]
            self.products.append(Product(func, tuple(tuple(t.shape) for t in operands),
                                         tuple(t.stride() for t in operands), operands[-1].dtype,
                                         {k: v for k, v in kwargs.items() if k in ('beta', 'alpha')},
                                         tuple(t.data_ptr() for t in operands)))
        elif 'scaled_dot_product' in func.__name__ and 'attention' in func.__name__:
            # Fused attention: its products, forward or backward (the backward's first operand is $dO$)
            backward = 'backward' in func.__name__
            q, k = (args[1], args[2]) if backward else (args[0], args[1])
            self.products.extend(_attention_products(q, k, backward))
        return func(*args, **kwargs)


def record_products(step: Callable[[], None]) -> List[Product]:
    """The matrix products that `step()` runs, in order."""
    recorder = _Recorder()
    with recorder:
        step()
    return recorder.products


def replay_seconds(products: List[Product], device: str, repeats: int = 5) -> float:
    """Median seconds of running `products` back to back on operands and outputs made beforehand."""
    calls = []
    # Operands by where the step had them, and outputs by shape: made once each. Past `budget` bytes of operands
    # (a large model's step touches more distinct tensors than memory holds twice), operands of the same shape
    # share one tensor: the products stay the same, only which of them reuse an operand changes
    made: Dict[tuple, torch.Tensor] = {}
    budget, used = 2 * 2 ** 30, 0
    for p in products:
        operands = []
        for shape, stride, address in zip(p.shapes, p.strides, p.addresses):
            key = (address if used < budget else 'shared', shape, stride, p.dtype)
            if key not in made or address is None:
                made[key] = _operand(shape, stride, device, p.dtype)
                used += made[key].untyped_storage().nbytes()
            operands.append(made[key])
        # The product's result, written in place every time
        a, b = operands[-2], operands[-1]
        out_shape = tuple(a.shape[:-1] + b.shape[-1:])
        out = made.setdefault(('out', out_shape, p.dtype), torch.empty(out_shape, device=device, dtype=p.dtype))
        calls.append((p.op.overloadpacket.out, operands, out, p.kwargs))
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        for op, operands, out, kwargs in calls:
            op(*operands, out=out, **kwargs)
        sync()
        times.append(time.perf_counter() - start)
    # The first run is a warm-up
    return statistics.median(times[1:])


def floor_fields(products: List[Product], tokens: int, step_s: float, device: str) -> dict:
    """The JSON fields of a model's floor: its products, their time, and the step's fraction of it."""
    floor_s = replay_seconds(products, device)
    flop = sum(p.flop for p in products)
    return {'floor_products': len(products), 'floor_gflop': flop / 1e9, 'floor_s': floor_s,
            'floor_gflops_per_s': flop / floor_s / 1e9, 'floor_tokens_per_s': tokens / floor_s,
            'fraction_of_floor': floor_s / step_s}
