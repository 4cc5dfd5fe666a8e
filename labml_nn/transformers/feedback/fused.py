r"""
---
title: The fused training loop, with a hand-written backward pass
summary: The whole step-by-step loop of a Feedback Transformer as one autograd function. The forward runs
  without autograd bookkeeping; the backward walks the steps in reverse by hand and computes weight gradients
  with large batched matrix products.
---

# Fused training loop

At the sizes where the Feedback Transformer is trained on a CPU ($d_{model} = 128$, a batch of 16) every
operation inside the loop is tiny, and the time goes to dispatching operations and recording the autograd
graph, not to arithmetic. With $T$ steps and $L$ layers autograd records and replays about $30\,T L$ nodes.

`fused_forward` computes exactly the same function as the module loop of [transformer.py](transformer.html), but
as **one** `torch.autograd.Function`:

* **Forward** ([fused_steps.py](fused_steps.html)): the loop with plain tensor operations (no modules, no graph),
  keeping step by step what the backward pass needs.
* **Backward** ([fused_backward.py](fused_backward.html)): backpropagation through time by hand, from the last step
  to the first, with the formula of every block written beside its code.
* **Weight gradients are batched:** a weight gradient is a sum over steps, e.g.
  $\frac{\partial \mathcal{L}}{\partial W_q} = \sum_t \delta q_t^\top z_t$. Inside the loop we only keep
  $\delta q_t$; every few steps one matrix product over all their rows (steps $\times$ batch) adds them up.

The loop reads its weights and keeps its records in named structures ([fused_records.py](fused_records.html)):
`LayerWeights`, `StepRecord`, `DropoutMasks`, ...

Everything computed from parameters *outside* the loop (the folded key/value matrix, $\mathrm{softmax}(w)$, the
relative position terms, the final norm) stays in autograd, so their gradients flow back to the parameters
through ordinary autograd nodes.

The keys and values live in a work buffer with [the cache's layout](state.html#layout); the buffer starts with
the cache of earlier calls (`prev`), so slot 0 of the buffer is absolute step `first = n_start - n_prev`. Under
`torch.autocast` the forward pass follows autocast's rules by hand ([as the steps say](fused_steps.html)); the
backward pass does the same, and accumulates weight gradients in float32.

The tests compare both loops with a naive reference in float64, and `torch.autograd.gradcheck` checks this
backward pass, dropout included.

<a id="steps"></a>

## One step, one function

The loops run each step through a function of its own: `feedback_step` forward, `backward_step` in reverse. Each
reads only its arguments and returns what it made (the loops write the work buffer and keep the records), so
`torch.compile` can compile either whole: `fused_forward(..., steps=compiled_steps())`, with symbolic sizes,
since the slice of memory a step sees grows by a slot per step. The model trains with the eager functions:
compiled, they make the loop only a little faster at the README's size ([the results
page](../../results.html#compiled-training), variant `compiled-steps`), because a compiled call spends about as
long taking in and handing out its many small tensors (the weights, the records) as the eager step spends
dispatching its operations.
"""

from functools import lru_cache
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from labml_nn.transformers.feedback.compiled import compile_options
from labml_nn.transformers.feedback.fused_backward import backward_loop, backward_step
from labml_nn.transformers.feedback.fused_records import (
    DropoutMasks,
    LoopConfig,
    LoopShape,
    StepRecord,
    flatten_layers,
    split_layers,
)
from labml_nn.transformers.feedback.fused_steps import (
    FeedbackModel,
    StepOutput,
    feedback_step,
    loop_inputs,
    run_steps,
    weights_for_products,
    widest_memory,
)
from labml_nn.transformers.feedback.stack import first_visible
from labml_nn.transformers.feedback.state import FeedbackState


class LoopSteps(NamedTuple):
    """The functions that run one step of the loop, forward and in reverse (`EAGER_STEPS`, or those compiled)."""
    forward: Callable
    backward: Callable


EAGER_STEPS = LoopSteps(feedback_step, backward_step)


def compiled_steps() -> LoopSteps:
    """
    Both step functions compiled by `torch.compile` with symbolic sizes (inductor's default mode, without its
    duplicate size checks). A step without memory (the first of a sequence, once per call) takes a branch of its
    own and runs eagerly: compiled, its records' `None` attention made dynamo fail while it explained a guard.
    """
    options = dict(dynamic=True, **compile_options('default'))
    forward, backward = torch.compile(feedback_step, **options), torch.compile(backward_step, **options)

    # The step sees the slots `lo .. hi - 1`: none when `lo == hi`
    def step_forward(cfg: LoopConfig, x: torch.Tensor, i: int, lo: int, hi: int, *rest) -> StepOutput:
        if lo == hi:
            return feedback_step(cfg, x, i, lo, hi, *rest)
        return forward(_step_config(cfg), x, i, lo, hi, *rest)

    def step_backward(cfg: LoopConfig, i: int, lo: int, hi: int, *rest) -> tuple:
        if lo == hi:
            return backward_step(cfg, i, lo, hi, *rest)
        return backward(_step_config(cfg), i, lo, hi, *rest)

    return LoopSteps(step_forward, step_backward)


def fused_forward(model: FeedbackModel, x_seq: torch.Tensor, state: Optional[FeedbackState],
                  return_state: bool,
                  steps: LoopSteps = EAGER_STEPS) -> Union[torch.Tensor, Tuple[torch.Tensor, FeedbackState]]:
    """
    `model(x_seq, state, return_state)` (a Feedback Transformer, [transformer.py](transformer.html)) with the step
    loop as one autograd function: the same outputs and gradients as its module loop. `steps` runs each step
    ([the step functions, compiled or not](#steps)).
    """
    seq_len, batch_size, _ = x_seq.shape
    # Absolute steps `n_start .. n_end - 1` of the sequence
    n_start = 0 if state is None else state.n_steps
    n_end = n_start + seq_len
    # Dropout in training mode only
    cfg, layers, mem_w, kv_w, kv_b = loop_inputs(model, x_seq, n_start, return_state, model.training)
    # The cache the first step attends to (it carries the earlier calls' autograd history, unless detached), or an
    # empty one, `[groups, 2, batch_size, heads, n_prev, d_k]`
    if state is None:
        prev = x_seq.new_empty((model.groups, 2, batch_size, model.heads, 0, model.d_k),
                               dtype=cfg.dtype or x_seq.dtype)
    else:
        prev = state.visible
    out, cache = FeedbackLoopFunction.apply(cfg, steps, x_seq, prev, mem_w, kv_w, kv_b, *flatten_layers(layers))
    # $\mathrm{LN}(x_t^L)$, in autograd
    out = model.norm(out)
    if not return_state:
        return out
    # The state: the part of the cache that the next step sees, its gradients flowing through `cache` (whose slot 0
    # is the first of the `prev` entries)
    first_row = n_start - prev.shape[4]
    visible = cache[..., first_visible(n_end, model.memory_span) - first_row:, :]
    return out, FeedbackState.from_cache(visible, n_end, model.memory_span)


@lru_cache(maxsize=16)
def _step_config(cfg: LoopConfig) -> LoopConfig:
    """
    `cfg` as the compiled steps read it: without the call's dropout seed and first step, which change from call to
    call and which the steps do not read (the compiler would compile again for each value).
    """
    return cfg._replace(seed=0, n_start=0)


class FeedbackLoopFunction(torch.autograd.Function):
    r"""
    Inputs: `cfg`, `steps` (`LoopSteps`), `x_seq [T, B, D]`, `prev` (the visible cache before this call,
    `[groups, 2, B, heads, n_prev, d_k]`, possibly with `n_prev = 0`), `mem_w` ($\mathrm{softmax}(w)$, `[L + 1]`),
    `kv_w [groups * 2 * D, D]`, `kv_b [groups * 2 * D]` (`None` without `memory_norm`), then every layer's
    `LayerWeights`, flattened.

    Outputs: the last layer's outputs `[T, B, D]` (before the final norm) and the work buffer, the cache this call
    can see and made, `[groups, 2, B, heads, n_prev + n_new, d_k]`.

    **What goes on `ctx`.** The inputs and the work buffer are handed to `ctx.save_for_backward`, so autograd
    checks that nobody changed them in place before the backward pass. The per-step records are intermediate
    values made inside `forward`, outside any graph and never seen by the caller: nothing else can modify them, so
    they are kept as plain attributes of `ctx` (they go when the graph is freed). `forward` and the context setup
    stay in one function (rather than `setup_context`) because what is saved is made *during* the forward loop.
    """

    @staticmethod
    def forward(ctx, cfg: LoopConfig, steps: LoopSteps, x_seq: torch.Tensor, prev: torch.Tensor, mem_w: torch.Tensor,
                kv_w: torch.Tensor, kv_b: Optional[torch.Tensor], *flat_layers: torch.Tensor):
        T, B, D = x_seq.shape
        n_prev = prev.shape[4]
        # The last step's memory is only made when a later call will attend to it
        shape = LoopShape(T, B, D, n_prev, T if cfg.make_last_memory else T - 1, cfg.n_start - n_prev)
        # The products' dtype (autocast's, or the inputs' own), and the weights cast to it once
        low = cfg.dtype or x_seq.dtype
        layers, kv_w_low, kv_b_low = weights_for_products(split_layers(cfg.n_layers, flat_layers), kv_w, kv_b, low)
        # The work buffer, `[groups, 2, B, H, time, d_k]` in the products' dtype, starting with earlier calls' cache
        work = x_seq.new_empty((cfg.groups, 2, B, cfg.heads, n_prev + shape.n_new, cfg.d_k), dtype=low)
        work[..., :n_prev, :] = prev
        # All dropout masks of the call at once (from `cfg.seed`), and a record per step for the backward pass
        masks = DropoutMasks(cfg, x_seq, T, B, D, layers[0].w_1.shape[0],
                             n_max=widest_memory(cfg.n_start, T, cfg.memory_span))
        records: List[Optional[StepRecord]] = [None] * T
        out = run_steps(cfg, x_seq, layers, mem_w, kv_w_low, kv_b_low, work, shape.first, masks, records,
                        steps.forward)
        ctx.cfg, ctx.steps, ctx.shape, ctx.masks, ctx.records = cfg, steps, shape, masks, records
        # The low-precision copies of the weights are made here from the inputs: kept like the records
        ctx.low_weights = (layers, kv_w_low)
        ctx.has_kv_b = kv_b is not None
        ctx.save_for_backward(x_seq, mem_w, kv_w, work, *flat_layers)
        return out, work

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: torch.Tensor, d_work: Optional[torch.Tensor]):
        # `d_out` `[T, B, D]`: the gradient of the outputs; `d_work`: of the returned cache, when a later call (or
        # the state) used it, else `None`
        x_seq, mem_w, kv_w, work, *flat_layers = ctx.saved_tensors
        layers = split_layers(ctx.cfg.n_layers, flat_layers)
        grads = backward_loop(ctx, x_seq, mem_w, kv_w, work, layers, d_out, d_work)
        # One gradient per input of `forward`, in order: none for `cfg` and `steps`
        return (None, None, grads.x_seq, grads.prev, grads.mem_w, grads.kv_w, grads.kv_b if ctx.has_kv_b else None,
                *flatten_layers(grads.layers))
