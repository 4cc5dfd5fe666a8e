r"""
---
title: The fused loop's backward pass
summary: Backpropagation through time by hand for the Feedback Transformer, each gradient block beside its
  formula, with weight gradients computed in large batched products.
---

# Backward pass of the fused loop

This is the backward pass of [the fused loop](fused.html): given $\delta y_t = \partial \mathcal{L} / \partial
x_t^L$ for every step (the final norm and the head are outside the loop, in autograd), it walks the steps from
last to first. We write $\delta a$ for $\partial \mathcal{L} / \partial a$ and use the names of the forward pass.

## One step, top to bottom

**1. The memory.** Every later step that attended to $m_t$ has already added its share to the gradient of
$k_t, v_t$ (in the work buffer's gradient, where gradients from later calls also arrive). So the gradient of
the step's keys and values, $\delta \kappa_t$ (all groups, `[B, groups * 2 * D]`), is complete, and

$$\begin{aligned}
\delta \hat m_t &= \delta \kappa_t\, W_{kv}, \\
\delta x_t^l &\mathrel{+}= \mathrm{softmax}(w)_l\, \delta m_t \quad (l = 0 \dots L),
\end{aligned}$$

where $\hat m_t = m_t$ without `memory_norm`, and with it $\delta m_t$ is the layer-norm backward below (without
gain and bias: those are folded into $W_{kv}$).

**2. Layer norm.** For $y = \gamma \odot \hat x + \beta$ with $\hat x = (x - \mu)/\sigma$ over the $D$ features,

$$\begin{aligned}
\delta x &= \frac{1}{\sigma}\Big(g - \overline{g} - \hat x\, \overline{g \odot \hat x}\Big),
  \quad g = \gamma \odot \delta y, \\
\delta \gamma &= \textstyle\sum \delta y \odot \hat x, \qquad \delta \beta = \textstyle\sum \delta y,
\end{aligned}$$

where $\overline{\,\cdot\,}$ is the mean over features. ATen's `native_layer_norm_backward` computes $\delta x$ from
the saved $\mu, 1/\sigma$; the sums over rows wait for the batched weight gradients (4).

**3. The blocks of layer $l$, from its output down.** The feed-forward block computed
$x \leftarrow x_1 + M_2 \odot f$ with $f = W_2 h + b_2$, $h = M_h \odot \mathrm{ReLU}(a)$,
$a = W_1 z_2 + b_1$, $z_2 = \mathrm{LN}_2(x_1)$, where the $M$ are the scaled dropout masks:

$$\begin{aligned}
\delta f &= M_2 \odot \delta x, & \delta h &= \delta f\, W_2, \\
\delta a &= M_h \odot [a > 0] \odot \delta h, & \delta z_2 &= \delta a\, W_1, \\
\delta x_1 &= \delta x + \mathrm{LN}_2\text{-backward}(\delta z_2). &&
\end{aligned}$$

The attention block computed $x_1 = x + M_1 \odot (W_o o + b_o)$ with, per head,
$o = \sum_j \tilde P_j v_j$, $\tilde P = M_P \odot P$, $P = \mathrm{softmax}(S / \sqrt{d_k})$ and the score of
slot $j$ at distance $\Delta_j = t - j$

$$\begin{aligned}
S_j &= (q + u)^\top k_j + q^\top p_{\Delta_j} + s_{\Delta_j}, \\
q &= W_q z, \qquad z = \mathrm{LN}_1(x).
\end{aligned}$$

Dropout enters $\delta P$ through its mask, and the softmax backward is linear in $\delta P$, so the scale
$1/\sqrt{d_k}$ can go first:

$$\begin{aligned}
\delta o &= (M_1 \odot \delta x_1)\, W_o, & \delta \tilde P_j &= \delta o^\top v_j, \\
\delta v_j &\mathrel{+}= \tilde P_j\, \delta o, & \delta P &= M_P \odot \delta \tilde P, \\
\delta S &= \tfrac{1}{\sqrt{d_k}}\, P \odot \big(\delta P - \textstyle\sum_i P_i\, \delta P_i\big). &&
\end{aligned}$$

Then the score's three terms give

$$\begin{aligned}
\delta (q + u) &= \textstyle\sum_j \delta S_j\, k_j, \qquad \delta k_j \mathrel{+}= \delta S_j\, (q + u), \\
\delta q &= \delta (q + u) + \textstyle\sum_j \delta S_j\, p_{\Delta_j}, \\
\delta z &= \delta q\, W_q, \qquad \delta x \mathrel{+}= \mathrm{LN}_1\text{-backward}(\delta z).
\end{aligned}$$

The $\delta k_j, \delta v_j$ of all layers of the step go into the cache's gradient in one batched product
(`add_cache_gradient`).

**Mixed precision.** Under autocast the forward pass took matrix products in low precision; here too: each
product's operands are cast to the products' dtype and its result back where the forward pass had high precision
(the residual stream, layer norms, softmax, the memory). The cache's gradient and the weight gradients are
accumulated in float32, so the sums over steps lose nothing to the low precision.

**4. Weight gradients wait.** Each is a sum over steps of an outer product, e.g.
$\delta W_2 = \sum_t \delta f_t^\top h_t$, so a step only keeps its $\delta$'s (`StepGrads`). Every few steps
(`CHUNK_ROWS` rows of steps $\times$ batch) `WeightGrads.add` turns them into weight gradients with one matrix
product per weight. The position tables need care: step $t$ saw $n_t$ slots whose distances are the **last** $n_t$
rows of the call's table ($N \dots 1$), so its $\delta S$ is right-aligned into a `[steps, B, H, N]` buffer, and

$$\begin{aligned}
\delta p_\Delta &= \textstyle\sum_{t, b} \delta S_{t, t - \Delta}\, q_t, \\
\delta s_\Delta &= \textstyle\sum_{t, b} \delta S_{t, t - \Delta}.
\end{aligned}$$
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from labml_nn.transformers.feedback.fused_records import (
    LayerWeights,
    LoopConfig,
    StepRecord,
    caster,
    group_views,
)

# ATen kernels called directly, resolved once (their Python lookups cost more than the kernels at these sizes)
_layer_norm_backward = torch.ops.aten.native_layer_norm_backward.default
_relu_backward = torch.ops.aten.threshold_backward.default

# How many rows (steps x batch) of per-step gradients to keep before turning them into weight gradients
CHUNK_ROWS = 2048


# ## The gradients of one step


class FfnGrads(NamedTuple):
    """A feed-forward block's $\\delta f$, $\\delta a$ and $\\delta z_2$, each `[B, ...]`."""
    d_f: torch.Tensor
    d_a: torch.Tensor
    d_z2: torch.Tensor


class AttnGrads(NamedTuple):
    """An attention block's $\\delta$ of its output (after the residual mask), $q$, $q + u$, $z$ and $S$."""
    d_att: torch.Tensor
    d_q: torch.Tensor
    d_qu: torch.Tensor
    d_z: torch.Tensor
    # $\delta S$, `[B, H, n]`
    d_scores: torch.Tensor


class StepGrads(NamedTuple):
    """The per-step gradients that weight gradients are made of."""
    i: int
    # $\delta \kappa_t$ `[B, groups * 2 * D]` and $\delta m_t$ `[B, D]`, at steps that made memory (else `None`)
    d_kv: Optional[torch.Tensor]
    d_mem: Optional[torch.Tensor]
    # Per layer; `attn[l]` is `None` at a step without memory
    ffn: List[Optional[FfnGrads]]
    attn: List[Optional[AttnGrads]]


class LoopGrads(NamedTuple):
    """The gradients `FeedbackLoopFunction.backward` returns (`None` where there is none)."""
    x_seq: torch.Tensor
    prev: Optional[torch.Tensor]
    mem_w: Optional[torch.Tensor]
    kv_w: Optional[torch.Tensor]
    kv_b: Optional[torch.Tensor]
    layers: List[LayerWeights]


# ## The loop in reverse


def backward_loop(ctx, x_seq: torch.Tensor, mem_w: torch.Tensor, kv_w: torch.Tensor, work: torch.Tensor,
                  layers: List[LayerWeights], d_out: torch.Tensor,
                  d_cache: Optional[torch.Tensor]) -> LoopGrads:
    """
    The gradients of `FeedbackLoopFunction`'s inputs, from `d_out` `[T, B, D]` and `d_cache` (the gradient of
    the returned work buffer, from later calls, or `None`). `ctx` holds the forward pass's `cfg`, `shape`,
    `masks`, per-step `records` and the weights in the products' dtype.
    """
    with torch.autocast(x_seq.device.type, enabled=False):
        return _backward_steps(ctx, x_seq, mem_w, work, layers, d_out, d_cache)


def _backward_steps(ctx, x_seq: torch.Tensor, mem_w: torch.Tensor, work: torch.Tensor,
                    layers: List[LayerWeights], d_out: torch.Tensor,
                    d_cache: Optional[torch.Tensor]) -> LoopGrads:
    cfg, shape, masks, records = ctx.cfg, ctx.shape, ctx.masks, ctx.records
    # The weights as the forward pass multiplied by them (the products' dtype)
    low_layers, kv_w = ctx.low_weights
    T, B, D, n_prev, n_new, first = shape
    G, H, dk = cfg.groups, cfg.heads, cfg.d_k
    # The cache's gradient (those from later calls arrive in `d_cache`), in the high precision, and the same as
    # `[groups * 2 * B * H, time, d_k]` so that one product per step updates every layer's keys and values
    d_work = torch.zeros_like(work, dtype=x_seq.dtype) if d_cache is None else d_cache.to(x_seq.dtype, copy=True)
    d_work_rows = d_work.view(G * 2 * B * H, -1, dk)
    keys, values = group_views(work, H, dk)
    views = BackwardViews(keys=keys, values=values,
                          pos_k=[lw.pos_emb.permute(1, 0, 2) for lw in low_layers],
                          mem_w=mem_w.unbind(0), no_input=work.new_zeros(()))
    acc = WeightGrads(layers, caster(work.dtype, x_seq.dtype))
    d_x_seq = torch.empty_like(x_seq)
    pending: List[StepGrads] = []
    chunk = max(1, CHUNK_ROWS // B)
    step = ctx.steps.backward
    for i in reversed(range(T)):
        rec = records[i]
        lo, hi = rec.lo, rec.hi
        dx, d_cache_rows, *grads = step(cfg, i, lo, hi, rec, d_out[i], d_work, layers, low_layers, kv_w,
                                        views, masks, i < n_new)
        if d_cache_rows is not None:
            # $\delta k_j, \delta v_j$ of the slots the step saw
            d_work_rows[:, lo:hi] += d_cache_rows
        d_x_seq[i] = dx
        pending.append(StepGrads(i, *grads))
        if len(pending) == chunk or i == 0:
            acc.add(records, pending, low_layers, cfg.memory_norm)
            pending = []

    d_prev = d_work[..., :n_prev, :].to(work.dtype) if n_prev else None
    d_mem_w = acc.mem_w if acc.mem_w is not None or not ctx.needs_input_grad[3] else torch.zeros_like(mem_w)
    return LoopGrads(d_x_seq, d_prev, d_mem_w, acc.kv_w, acc.kv_b, acc.layer_grads())


class BackwardViews(NamedTuple):
    """What every backward step of a call reads, arranged once per call (views, no copies)."""
    # Each group's keys and values `[B * H, time, d_k]`
    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    # $p_\Delta$ per layer and head, `[H, N, d_k]`
    pos_k: List[torch.Tensor]
    # $\mathrm{softmax}(w)_l$ for $l = 0 \dots L$, as 0-dimensional tensors
    mem_w: Tuple[torch.Tensor, ...]
    # A zero that stands for `input` in `baddbmm(input, ..., beta=0)`
    no_input: torch.Tensor


def backward_step(cfg: LoopConfig, i: int, lo: int, hi: int, rec: StepRecord, d_out_i: torch.Tensor,
                  d_work: torch.Tensor, layers: List[LayerWeights], low_layers: List[LayerWeights],
                  kv_w: torch.Tensor, views: BackwardViews, masks, made_memory: bool) -> tuple:
    r"""
    Step `i` (which saw the slots `lo .. hi - 1`) in reverse (1. and 3. above), from $\delta y_t$ `d_out_i`
    `[B, D]` and the cache's gradient `d_work`, complete at the step's own slot. Returns $\delta x_t^0$ `[B, D]`,
    what the step adds to the gradient of the cache slots it saw (`[groups * 2 * B * H, n, d_k]`, `None` at a step
    without memory), then the fields of its `StepGrads` after `i`. Free of side effects, so that `torch.compile`
    can compile it whole.
    """
    L, G, H, dk = cfg.n_layers, cfg.groups, cfg.heads, cfg.d_k
    B, D = d_out_i.shape
    BH = B * H
    n = hi - lo
    scale = 1 / dk ** 0.5
    to_low, to_high = caster(kv_w.dtype, d_out_i.dtype), caster(d_out_i.dtype, kv_w.dtype)
    d_kv = d_mem = None
    # 1. The memory: $\delta \kappa_t$ is complete, all later steps are done
    if made_memory:
        # (`narrow`, not an index: a compiled step keeps `hi` symbolic)
        d_kv = to_low(d_work.narrow(4, hi, 1).permute(2, 0, 1, 3, 4, 5).reshape(B, G * 2 * D))
        d_mem = to_high(torch.mm(d_kv, kv_w))
        if cfg.memory_norm:
            # Through $\hat m_t = (m_t - \mu)/\sigma$ (2., without gain and bias)
            mean, rstd = rec.mem_stats
            d_mem = _layer_norm_backward(d_mem, rec.mem, (D,), mean, rstd, None, None, (True, False, False))[0]
    # $\delta x_t^L = \delta y_t + \mathrm{softmax}(w)_L\, \delta m_t$
    dx = d_out_i if d_mem is None else torch.addcmul(d_out_i, d_mem, views.mem_w[L])
    ffn_grads: List[Optional[FfnGrads]] = [None] * L
    attn_grads: List[Optional[AttnGrads]] = [None] * L
    # Per layer (top first): $\delta S$, $\tilde P$, $q + u$ and $\delta o$, for the cache's gradient
    outer = []
    for l in reversed(range(L)):
        lw, lw_low = layers[l], low_layers[l]
        g = l if G > 1 else 0
        ffn = rec.ffn[l]
        # 3. The feed-forward block: $\delta f$, $\delta h$, $\delta a$, $\delta z_2$, then $\delta x_1$
        d_f = to_low(dx if masks.resid is None else dx * masks.resid[1, l, i])
        d_h = torch.mm(d_f, lw_low.w_2)
        d_a = _relu_backward(d_h, ffn.hidden, 0)
        if masks.hidden is not None:
            d_a = d_a * masks.hidden[l, i]
        d_z2 = to_high(torch.mm(d_a, lw_low.w_1))
        dx = dx + _layer_norm_backward(d_z2, ffn.x1, (D,), ffn.mean2, ffn.rstd2, lw.ln2_w, None,
                                       (True, False, False))[0]
        ffn_grads[l] = FfnGrads(d_f, d_a, d_z2)
        a = rec.attn[l]
        if a is not None:
            # The attention block: $\delta o$ `[B * H, 1, d_k]`
            d_att = to_low(dx if masks.resid is None else dx * masks.resid[0, l, i])
            d_o = torch.mm(d_att, lw_low.w_o).view(BH, 1, dk)
            pd = a.p if masks.attn is None else a.p * masks.attn_probs(l, i, n)
            # $\frac{1}{\sqrt{d_k}} \delta \tilde P$, then $\delta P$ through the mask, `[B, H, n]`
            d_pd = torch.baddbmm(views.no_input, d_o, views.values[g][:, lo:hi].transpose(1, 2), beta=0,
                                 alpha=scale)
            d_pd = to_high(d_pd.view(B, H, n))
            if masks.attn is not None:
                d_pd = d_pd * masks.attn_probs(l, i, n)
            # $\delta S = P \odot (\cdot - \sum_i P_i\, \cdot)$, back in the products' dtype
            d_scores = to_low(torch._softmax_backward_data(d_pd, a.p, -1, a.p.dtype))
            # $\delta (q + u) = \sum_j \delta S_j k_j$
            d_qu = torch.bmm(d_scores.view(BH, 1, n), views.keys[g][:, lo:hi])
            outer.append((d_scores, to_low(pd), a.qu, d_o))
            # $\delta q = \delta (q + u) + \sum_j \delta S_j\, p_{\Delta_j}$ (the last `n` distances)
            d_pos = torch.bmm(d_scores.transpose(0, 1), views.pos_k[l][:, -n:]).transpose(0, 1)
            d_q = (d_qu.view(B, H, dk) + d_pos).reshape(B, D)
            # $\delta z = \delta q W_q$ and $\delta x$ through $\mathrm{LN}_1$
            d_z = to_high(torch.mm(d_q, lw_low.w_q))
            dx = dx + _layer_norm_backward(d_z, rec.xs[l], (D,), a.mean, a.rstd, lw.ln1_w, None,
                                           (True, False, False))[0]
            attn_grads[l] = AttnGrads(d_att, d_q, d_qu.view(B, H, dk), d_z, d_scores)
        # $x_t^l$ (the input of layer $l$) also made the memory: $+\, \mathrm{softmax}(w)_l\, \delta m_t$
        if d_mem is not None:
            dx = torch.addcmul(dx, d_mem, views.mem_w[l])
    d_cache_rows = cache_gradient(outer, n, G, BH, dk) if outer else None
    return dx, d_cache_rows, d_kv, d_mem, ffn_grads, attn_grads


# ## The cache's gradient, all layers of a step at once


def cache_gradient(outer: list, n: int, G: int, BH: int, dk: int) -> torch.Tensor:
    r"""
    $\sum_l \delta S^l_{j} (q^l + u^l)$ for the keys and $\sum_l \tilde P^l_{j}\, \delta o^l$ for the values of the
    `n` slots $j$ that the step saw, `[groups * 2 * B * H, n, d_k]`, every layer in one batched product: with shared
    keys and values the sum over layers is the product's inner dimension; with per-layer ones each layer is a batch
    of its own.
    """
    L = len(outer)
    # Bottom layer first, as the groups are stored
    outer = outer[::-1]
    if G == 1:
        # `[2 * BH, n, L] @ [2 * BH, L, d_k]`: keys' rows first, then values'
        a = torch.stack([o[0] for o in outer] + [o[1] for o in outer]).view(2, L, BH, n)
        a = a.permute(0, 2, 3, 1).reshape(2 * BH, n, L)
        b = torch.stack([o[2] for o in outer] + [o[3] for o in outer]).view(2, L, BH, dk)
        b = b.permute(0, 2, 1, 3).reshape(2 * BH, L, dk)
    else:
        # `[L * 2 * BH, n, 1] @ [L * 2 * BH, 1, d_k]`: layer $l$'s keys and values at the rows of group $l$
        a = torch.stack([x for o in outer for x in (o[0], o[1])]).view(L * 2 * BH, n, 1)
        b = torch.stack([x for o in outer for x in (o[2], o[3])]).view(L * 2 * BH, 1, dk)
    return torch.bmm(a, b)


# ## Weight gradients: sums over steps


class WeightGrads:
    """Weight gradients, accumulated chunk by chunk with one product per weight (4. above)."""

    def __init__(self, layers: List[LayerWeights], to_low: Callable[[torch.Tensor], torch.Tensor]):
        # Products take their operands in the forward pass's products' dtype (`to_low`); sums are in the
        # parameters' dtype
        self.to_low = to_low
        self.high = layers[0].w_q.dtype
        # Per layer, one running sum per `LayerWeights` field
        self.layers: List[Dict[str, torch.Tensor]] = [
            {k: torch.zeros_like(t) for k, t in lw._asdict().items()} for lw in layers]
        self.mem_w: Optional[torch.Tensor] = None
        self.kv_w: Optional[torch.Tensor] = None
        self.kv_b: Optional[torch.Tensor] = None

    def layer_grads(self) -> List[LayerWeights]:
        return [LayerWeights(**g) for g in self.layers]

    @staticmethod
    def _add(current: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
        return new if current is None else current + new

    def add(self, records: List[StepRecord], steps: List[StepGrads], layers: List[LayerWeights],
            memory_norm: bool) -> None:
        """Add the weight gradients of `steps` (kept by the loop, latest first)."""
        steps = steps[::-1]
        cat, to_low, high = torch.cat, self.to_low, self.high
        for l, lw in enumerate(layers):
            g = self.layers[l]
            # The feed-forward block, rows of all steps stacked: $\delta W_2 = \sum \delta f^\top h$,
            # $\delta W_1 = \sum \delta a^\top z_2$, and $\mathrm{LN}_2$'s $\delta \gamma, \delta \beta$
            ffn_g = [sg.ffn[l] for sg in steps]
            d_f, d_a, d_z2 = (cat([x[k] for x in ffn_g]) for k in range(3))
            fs = [records[sg.i].ffn[l] for sg in steps]
            xhat2 = (cat([f.x1 for f in fs]) - cat([f.mean2 for f in fs])) * cat([f.rstd2 for f in fs])
            z2 = torch.addcmul(lw.ln2_b, xhat2, lw.ln2_w)
            g['w_2'] = g['w_2'] + torch.mm(d_f.t(), cat([f.hidden for f in fs]))
            g['b_2'] = g['b_2'] + d_f.sum(0, dtype=high)
            g['w_1'] = g['w_1'] + torch.mm(d_a.t(), to_low(z2))
            g['b_1'] = g['b_1'] + d_a.sum(0, dtype=high)
            g['ln2_w'] = g['ln2_w'] + (d_z2 * xhat2).sum(0)
            g['ln2_b'] = g['ln2_b'] + d_z2.sum(0)
            # The attention block, at the steps that had memory
            att_steps = [sg for sg in steps if sg.attn[l] is not None]
            if not att_steps:
                continue
            ga = [sg.attn[l] for sg in att_steps]
            sa = [records[sg.i].attn[l] for sg in att_steps]
            d_att, d_q, d_qu, d_z = (cat([x[k] for x in ga]) for k in range(4))
            xs = cat([records[sg.i].xs[l] for sg in att_steps])
            xhat = (xs - cat([a.mean for a in sa])) * cat([a.rstd for a in sa])
            z = torch.addcmul(lw.ln1_b, xhat, lw.ln1_w)
            # $\delta W_q = \sum \delta q^\top z$, $\delta u = \sum \delta (q + u)$,
            # $\delta W_o = \sum \delta(W_o o)^\top o$, and $\mathrm{LN}_1$'s $\delta \gamma, \delta \beta$
            g['w_q'] = g['w_q'] + torch.mm(d_q.t(), to_low(z))
            g['u'] = g['u'] + d_qu.sum(0, dtype=high)
            g['w_o'] = g['w_o'] + torch.mm(d_att.t(), cat([a.o for a in sa]))
            g['b_o'] = g['b_o'] + d_att.sum(0, dtype=high)
            g['ln1_w'] = g['ln1_w'] + (d_z * xhat).sum(0)
            g['ln1_b'] = g['ln1_b'] + d_z.sum(0)
            # Position tables: each step's $\delta S$ right-aligned by distance into `[steps, B, H, N]`
            B, H = d_qu.shape[0] // len(ga), d_qu.shape[1]
            d_scores = d_q.new_zeros((len(ga), B, H, lw.pos_emb.shape[0]))
            for k, x in enumerate(ga):
                d_scores[k, :, :, -x.d_scores.shape[-1]:] = x.d_scores
            q = torch.stack([a.q for a in sa]).view(len(ga), B, H, -1)
            # $\delta p_\Delta = \sum_{t, b} \delta S_{t, t - \Delta}\, q_t$ and
            # $\delta s_\Delta = \sum_{t, b} \delta S_{t, t - \Delta}$
            g['pos_emb'] = g['pos_emb'] + torch.einsum('tbhn,tbhd->nhd', d_scores, q)
            g['pos_bias'] = g['pos_bias'] + d_scores.sum((0, 1), dtype=high).t()
        # The memory: $\delta\, \mathrm{softmax}(w)_l = \sum_{t, b} \delta m_t \cdot x_t^l$,
        # $\delta W_{kv} = \sum_t \delta \kappa_t^\top \hat m_t$ and, with `memory_norm`,
        # $\delta b_{kv} = \sum_t \delta \kappa_t$
        mem_steps = [sg for sg in steps if sg.d_mem is not None]
        if not mem_steps:
            return
        xs = torch.stack([torch.stack(records[sg.i].xs) for sg in mem_steps])          # [n, L + 1, B, D]
        d_mem = torch.stack([sg.d_mem for sg in mem_steps])                              # [n, B, D]
        self.mem_w = self._add(self.mem_w, torch.einsum('tbd,tlbd->l', d_mem, xs))
        d_kv = cat([sg.d_kv for sg in mem_steps])
        mems = cat([records[sg.i].mem for sg in mem_steps])
        if memory_norm:
            # The projection read $\hat m_t$
            mems = (mems - cat([records[sg.i].mem_stats[0] for sg in mem_steps])) \
                * cat([records[sg.i].mem_stats[1] for sg in mem_steps])
            self.kv_b = self._add(self.kv_b, d_kv.sum(0, dtype=high))
        self.kv_w = self._add(self.kv_w, torch.mm(d_kv.t(), to_low(mems)).to(high))


