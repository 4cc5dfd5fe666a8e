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

This module computes exactly the same function as the module loop of [transformer.py](transformer.html), but as
**one** `torch.autograd.Function`:

* **Forward** (`run_steps`): the loop of `transformer.py` with plain tensor operations (no modules, no graph). It
  keeps, step by step, what the backward pass needs: each layer's input, normalisation statistics, query,
  attention probabilities, hidden activations, and the dropout masks.
* **Backward** ([fused_backward.py](fused_backward.html)): backpropagation through time by hand, from the last step
  to the first, with the formula of every block written beside its code.
* **Weight gradients are batched:** a weight gradient is a sum over steps, e.g.
  $\frac{\partial \mathcal{L}}{\partial W_q} = \sum_t \delta q_t^\top z_t$. Inside the loop we only keep
  $\delta q_t$; every few steps one matrix product over all their rows (steps $\times$ batch) adds them up.

The loop reads its weights and keeps its records in named structures, defined in
[fused_records.py](fused_records.html): `LayerWeights`, `StepRecord`, `DropoutMasks`, ...

Without autograd (evaluation, generation) `run_steps` alone runs: the same steps, keeping nothing, writing keys and
values straight into the state's cache.

The keys and values live in a work buffer with [the cache's layout](state.html#layout),
`[groups, 2, batch_size, heads, time, d_k]`; the buffer starts with the cache of earlier calls (`prev`), so slot
0 of the buffer is absolute step `first = n_start - n_prev`.

## Mixed precision

Under `torch.autocast` the loop follows autocast's rules explicitly (autocast itself is switched off inside, so
nothing is cast twice or per step): matrix products take their operands in autocast's low-precision dtype
(`cfg.dtype`, e.g. bfloat16), with every weight cast once per call; the residual stream, layer norms, softmax and
the weighted sum that makes the memory stay in the parameters' precision (float32), as autocast would keep them;
the cache holds low-precision keys and values, as the module loop's does. The backward pass does the same, and
accumulates weight gradients in float32.

It supports the standard building blocks (`FeedForward` with ReLU, not gated, with biases; affine layer norms);
`supports()` says whether a layer qualifies, and other configurations use the module loop. The tests compare both
loops with a naive reference in float64, and `torch.autograd.gradcheck` checks this backward pass, dropout
included.
"""

from typing import List, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from labml_nn.transformers.feed_forward import FeedForward
from labml_nn.transformers.feedback.fused_records import (
    NO_MASKS,
    AttnSaved,
    DropoutMasks,
    FfnSaved,
    LayerWeights,
    LoopConfig,
    LoopShape,
    StepRecord,
    caster,
    flatten_layers,
    for_products,
    split_layers,
)
from labml_nn.transformers.feedback.stack import first_visible


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of matrix products under `torch.autocast` on `device_type` (`'cpu'`, `'cuda'`), else `None`."""
    try:
        enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except TypeError:
        # PyTorch before 2.4 names the two device types' functions apart
        if device_type == 'cpu':
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        else:
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return dtype if enabled else None


class FeedbackLoopFunction(torch.autograd.Function):
    r"""
    Inputs: `cfg`, `x_seq [T, B, D]`, `prev` (the visible cache before this call,
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
    def forward(ctx, cfg: LoopConfig, x_seq: torch.Tensor, prev: torch.Tensor, mem_w: torch.Tensor,
                kv_w: torch.Tensor, kv_b: Optional[torch.Tensor], *flat_layers: torch.Tensor):
        T, B, D = x_seq.shape
        n_prev = prev.shape[4]
        # The last step's memory is only made when a later call will attend to it
        shape = LoopShape(T, B, D, n_prev, T if cfg.make_last_memory else T - 1, cfg.n_start - n_prev)
        # The products' dtype (autocast's, or the inputs' own), and the weights cast to it once
        low = cfg.dtype or x_seq.dtype
        layers = [for_products(lw, low) for lw in split_layers(cfg.n_layers, flat_layers)]
        kv_w_low, kv_b_low = kv_w.to(low), None if kv_b is None else kv_b.to(low)
        # The work buffer, `[groups, 2, B, H, time, d_k]` in the products' dtype, starting with earlier calls' cache
        work = x_seq.new_empty((cfg.groups, 2, B, cfg.heads, n_prev + shape.n_new, cfg.d_k), dtype=low)
        work[..., :n_prev, :] = prev
        # All dropout masks of the call at once (from `cfg.seed`), and a record per step for the backward pass
        masks = DropoutMasks(cfg, x_seq, T, B, D, layers[0].w_1.shape[0])
        records: List[Optional[StepRecord]] = [None] * T
        out = run_steps(cfg, x_seq, layers, mem_w, kv_w_low, kv_b_low, work, shape.first, masks, records)
        ctx.cfg, ctx.shape, ctx.masks, ctx.records = cfg, shape, masks, records
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
        # Imported here: the backward pass's module reads this one's structures
        from labml_nn.transformers.feedback.fused_backward import backward_loop
        x_seq, mem_w, kv_w, work, *flat_layers = ctx.saved_tensors
        layers = split_layers(ctx.cfg.n_layers, flat_layers)
        grads = backward_loop(ctx, x_seq, mem_w, kv_w, work, layers, d_out, d_work)
        # One gradient per input of `forward`, in order: none for `cfg`
        return (None, grads.x_seq, grads.prev, grads.mem_w, grads.kv_w, grads.kv_b if ctx.has_kv_b else None,
                *flatten_layers(grads.layers))


def run_steps(cfg: LoopConfig, x_seq: torch.Tensor, layers: List[LayerWeights], mem_w: torch.Tensor,
              kv_w: torch.Tensor, kv_b: Optional[torch.Tensor], work: torch.Tensor, first: int,
              masks: Optional[DropoutMasks] = None,
              records: Optional[List[Optional[StepRecord]]] = None) -> torch.Tensor:
    r"""
    The step loop, with plain tensor operations. Reads the cache from and writes new memory's keys and values
    into `work` (the cache's layout, slot 0 holding absolute step `first`), keeps what the backward pass needs
    in `records` (if given), and returns the last layer's outputs `[T, B, D]`.

    `layers`, `kv_w` and `kv_b` come with their product weights already in the products' dtype
    (`for_products`), the work buffer in that dtype too.
    """
    # Autocast's rules are followed by hand below
    with torch.autocast(x_seq.device.type, enabled=False):
        return _steps(cfg, x_seq, layers, mem_w, kv_w, kv_b, work, first, masks or NO_MASKS, records)


def _steps(cfg: LoopConfig, x_seq: torch.Tensor, layers: List[LayerWeights], mem_w: torch.Tensor,
           kv_w: torch.Tensor, kv_b: Optional[torch.Tensor], work: torch.Tensor, first: int, masks,
           records: Optional[List[Optional[StepRecord]]]) -> torch.Tensor:
    T, B, D = x_seq.shape
    L, G, H, dk = cfg.n_layers, cfg.groups, cfg.heads, cfg.d_k
    BH = B * H
    n_new = T if cfg.make_last_memory else T - 1
    # Operands of matrix products in the products' dtype (a no-op outside autocast); the residual stream, norms
    # and softmax stay in `x_seq`'s dtype
    to_low = caster(work.dtype, x_seq.dtype)
    high = x_seq.dtype
    # Each group's keys and values as `[B * H, time, d_k]` views of the work buffer
    keys = [work[g, 0].view(BH, -1, dk) for g in range(G)]
    values = [work[g, 1].view(BH, -1, dk) for g in range(G)]
    # Relative position terms, arranged for batched products over heads:
    # `pos_k [H, d_k, N]` and `pos_b [H, N]` (distances $N \dots 1$ from left to right)
    pos_k = [lw.pos_emb.permute(1, 2, 0) for lw in layers]
    pos_b = [lw.pos_bias.t() for lw in layers]
    # Transposed weights (views) for `input @ W^T`: $W_q^\top, W_o^\top, W_1^\top, W_2^\top$
    w_t = [(lw.w_q.t(), lw.w_o.t(), lw.w_1.t(), lw.w_2.t()) for lw in layers]
    kv_w_t = kv_w.t()
    scale = 1 / dk ** 0.5
    outputs = []
    for i in range(T):
        t = cfg.n_start + i
        # The slots step $t$ attends to (the same for every layer): `lo .. hi - 1`; slot `hi` is its own
        lo, hi = first_visible(t, cfg.memory_span) - first, t - first
        n = hi - lo
        x = x_seq[i]
        xs, attn_saved, ffn_saved = [x], [], []
        for l, lw in enumerate(layers):
            w_q_t, w_o_t, w_1_t, w_2_t = w_t[l]
            g = l if G > 1 else 0
            if n > 0:
                # $z = \mathrm{LN}(x)$ and $q = W_q z$
                z, mean, rstd = torch.native_layer_norm(x, (D,), lw.ln1_w, lw.ln1_b, cfg.eps)
                q = torch.mm(to_low(z), w_q_t)
                # $(q + u)^\top k_j$ for all $j$: `[B * H, 1, n]`
                qu = to_low((q.view(B, H, dk) + lw.u).view(BH, 1, dk))
                content = torch.bmm(qu, keys[g][:, lo:hi].transpose(1, 2))
                # $\frac{1}{\sqrt{d_k}}(q^\top p_\Delta + s_\Delta)$, one product per head: `[H, B, n]`
                position = torch.baddbmm(pos_b[l][:, None, -n:], q.view(B, H, dk).transpose(0, 1),
                                         pos_k[l][:, :, -n:], beta=scale, alpha=scale)
                # All scores, scaled, and $P = \mathrm{softmax}_j$ (in the high precision): `[B, H, n]`
                scores = torch.add(position.transpose(0, 1), content.view(B, H, n), alpha=scale)
                p = torch.softmax(scores, dim=-1, dtype=high)
                # $\tilde P$: dropout on the probabilities
                pd = p if masks.attn is None else p * masks.attn_probs(l, i, n)
                # $o = \sum_j \tilde P_j v_j$, heads concatenated: `[B, D]`
                o = torch.bmm(to_low(pd).view(BH, 1, n), values[g][:, lo:hi]).view(B, D)
                # $x_1 = x + \mathrm{Drop}(W_o o + b_o)$
                att = torch.addmm(lw.b_o, o, w_o_t)
                x1 = x + att if masks.resid is None else torch.addcmul(x, att, masks.resid[0, l, i])
                attn_saved.append(AttnSaved(mean, rstd, q, qu, p, o))
            else:
                # The first step of a sequence has no memory to attend to
                x1 = x
                attn_saved.append(None)
            # $x \leftarrow x_1 + \mathrm{Drop}(W_2\, \mathrm{Drop}(\mathrm{ReLU}(W_1 \mathrm{LN}(x_1) + b_1)) + b_2)$
            z2, mean2, rstd2 = torch.native_layer_norm(x1, (D,), lw.ln2_w, lw.ln2_b, cfg.eps)
            hidden = torch.relu_(torch.addmm(lw.b_1, to_low(z2), w_1_t))
            if masks.hidden is not None:
                hidden = hidden * masks.hidden[l, i]
            ff = torch.addmm(lw.b_2, hidden, w_2_t)
            x = x1 + ff if masks.resid is None else torch.addcmul(x1, ff, masks.resid[1, l, i])
            ffn_saved.append(FfnSaved(x1, mean2, rstd2, hidden))
            xs.append(x)
        record = None if records is None else StepRecord(xs, attn_saved, ffn_saved, lo, hi)
        outputs.append(x)
        if i < n_new:
            # $m_t = \sum_l \mathrm{softmax}(w)_l x_t^l$, one product over the stacked layer outputs (high precision)
            mem = torch.mm(mem_w.view(1, L + 1), torch.stack(xs).view(L + 1, B * D)).view(B, D)
            if cfg.memory_norm:
                # $\hat m_t = (m_t - \mu) / \sigma$; the norms' gains and biases are folded into `kv_w`, `kv_b`
                # ([transformer.py](transformer.html#_FeedbackLoop.kv_projection))
                mem_hat, mem_mean, mem_rstd = torch.native_layer_norm(mem, (D,), None, None, cfg.memory_eps)
                kv = torch.addmm(kv_b, to_low(mem_hat), kv_w_t)
            else:
                kv = torch.mm(to_low(mem), kv_w_t)
            # Its keys and values for every group, into slot `hi`: `[B, G, 2, H, d_k]` to the cache's layout
            work[..., hi, :] = kv.view(B, G, 2, H, dk).permute(1, 2, 0, 3, 4)
            if record is not None:
                record.mem = mem
                if cfg.memory_norm:
                    record.mem_stats = (mem_mean, mem_rstd)
        if records is not None:
            records[i] = record

    return torch.stack(outputs)


def run_loop(cfg: LoopConfig, x_seq: torch.Tensor, prev: Optional[torch.Tensor], mem_w: torch.Tensor,
             kv_w: torch.Tensor, kv_b: Optional[torch.Tensor], layers: List[LayerWeights]):
    """Run `FeedbackLoopFunction`; `prev` may be `None` (empty cache), `kv_b` is `None` without `memory_norm`."""
    if prev is None:
        prev = x_seq.new_empty((cfg.groups, 2, x_seq.shape[1], cfg.heads, 0, cfg.d_k),
                               dtype=cfg.dtype or x_seq.dtype)
    return FeedbackLoopFunction.apply(cfg, x_seq, prev, mem_w, kv_w, kv_b, *flatten_layers(layers))


def supports(layer: nn.Module) -> bool:
    """Whether the fused loop implements this layer's building blocks exactly."""
    ff = layer.feed_forward
    norms = (layer.norm_self_attn, layer.norm_ff)
    return (type(ff) is FeedForward and not ff.is_gated and type(ff.activation) is nn.ReLU
            and ff.layer1.bias is not None and ff.layer2.bias is not None
            and all(type(n) is nn.LayerNorm and n.elementwise_affine and n.bias is not None for n in norms))
