r"""
---
title: The fused loop's backward pass
summary: Backpropagation through time by hand for the Feedback Transformer, with weight gradients computed in
  large batched products.
---

# Backward pass of the fused loop

We walk the steps from last to first. At step $t$:

1. **The memory.** Every later step that attended to $m_t$ has added its gradient to $k_t, v_t$ (in `d_work`),
   and gradients from later calls arrive with the returned cache rows. So
   $\delta m_t = [\delta k_t; \delta v_t]\, W_{kv}$ is complete, and $x_t^l$ receives
   $\mathrm{softmax}(w)_l\, \delta m_t$.
2. **The layers, top to bottom.** For the feed-forward block, with $a = z W_1^\top + b_1$ and
   $h = \mathrm{ReLU}(a)$ (after dropout),
   $\delta h = \delta f\, W_2$, $\delta a = \delta h \odot [a > 0]$, $\delta z = \delta a\, W_1$ and the layer
   norm's backward gives $\delta x$. For attention, with probabilities $P$ (after dropout $\tilde P$) over the
   visible slots,
   $$\delta o = \delta\mathrm{Attn}\, W_o, \quad \delta \tilde P = \delta o\, V^\top, \quad
     \delta v_j \mathrel{+}= \tilde P_j\, \delta o, \quad
     \delta A = \tfrac{1}{\sqrt{d_k}}\, P \odot \big(\delta P - \textstyle\sum_j P_j \delta P_j\big),$$
   $$\delta (q + u) = \delta A\, K, \quad \delta k_j \mathrel{+}= \delta A_j (q + u), \quad
     \delta q = \delta (q + u) + \textstyle\sum_j \delta A_j\, p_{t-j}.$$
3. **Weight gradients wait.** Each is a sum over steps of an outer product, so the step only keeps its
   $\delta$'s. Every few steps (`CHUNK_ROWS` rows of steps $\times$ batch) we turn the kept $\delta$'s into
   weight gradients with one matrix product per weight, and drop them.
"""

from typing import List, Optional

import torch

# ATen kernels called directly, resolved once (their Python lookups cost more than the kernels at these sizes)
_layer_norm_backward = torch.ops.aten.native_layer_norm_backward.default
_relu_backward = torch.ops.aten.threshold_backward.default

# How many rows (steps x batch) of per-step gradients to keep before turning them into weight gradients
CHUNK_ROWS = 2048


def backward_loop(cfg, s, masks, shape, d_out: torch.Tensor, d_cache: Optional[torch.Tensor], x_seq: torch.Tensor,
                  mem_w: torch.Tensor, kv_w: torch.Tensor, work: torch.Tensor, layers, needs_input_grad):
    """
    Gradients of `FeedbackLoopFunction`'s inputs after `cfg`: `x_seq, prev, mem_w, kv_w`, then each layer's tensors
    (`layers` is a list of per-layer tuples in `LAYER_TENSORS` order).
    """
    T, B, D, n_prev, n_new, first = shape
    L, G, H, dk = cfg.n_layers, cfg.groups, cfg.heads, cfg.d_k
    BH = B * H
    scale = 1 / dk ** 0.5
    # Gradients of the cache; those from later calls come in `d_cache`
    d_work = torch.zeros_like(work) if d_cache is None else d_cache.clone()
    # The cache's gradient as `[groups * 2 * B * H, time, d_k]`: one product per step updates every layer's keys
    # and values
    d_work_rows = d_work.view(G * 2 * BH, -1, dk)
    keys = [work[g, 0].view(BH, -1, dk) for g in range(G)]
    values = [work[g, 1].view(BH, -1, dk) for g in range(G)]
    pos_k = [lt[2].permute(1, 0, 2) for lt in layers]                     # [H, N, d_k]
    acc = _WeightGrads(layers)
    d_x_seq = torch.empty_like(x_seq)
    pending: List[_StepGrads] = []
    chunk = max(1, CHUNK_ROWS // B)
    # Stands for `input` in `baddbmm(input, ..., beta=0)`
    no_input = x_seq.new_zeros(())

    # Loop invariants as locals: the weights each layer's backward needs, $\mathrm{softmax}(w)$ as floats, masks
    weights = [(lt[0], lt[4], lt[6], lt[8], lt[10], lt[12]) for lt in layers]
    mem_ws = mem_w.tolist()
    resid, hidden_mask, attn_mask = masks.resid, masks.hidden, masks.attn

    for i in reversed(range(T)):
        sg = _StepGrads(i, L)
        ffn_i, attn_i, xs_i = s.ffn[i], s.attn[i], s.xs[i]
        d_mem = None
        # Per layer (top first): $\delta A_t$, $\tilde P_t$, $q_t + u$ and $\delta o_t$, for the cache's gradient
        outer = []
        if i < n_new:
            # $\delta (k_t, v_t)$ is complete: all later steps are done
            slot = cfg.n_start + i - first
            sg.d_kv = d_work[..., slot, :].permute(2, 0, 1, 3, 4).reshape(B, G * 2 * D)
            d_mem = torch.mm(sg.d_kv, kv_w)
            if cfg.memory_norm:
                # Through $\hat m_t = (m_t - \mu) / \sigma$ (the gains are in `kv_w`)
                mean, rstd = s.mem_stats[i]
                d_mem = _layer_norm_backward(d_mem, s.mems[i], (D,), mean, rstd, None, None, (True, False, False))[0]
            sg.d_mem = d_mem
        dx = d_out[i] if d_mem is None else torch.add(d_out[i], d_mem, alpha=mem_ws[L])
        for l in reversed(range(L)):
            w_q, w_o, ln1_w, ln2_w, w_1, w_2 = weights[l]
            g = l if G > 1 else 0
            x1, mean2, rstd2, hidden = ffn_i[l]
            # The feed-forward block
            d_ff = dx if resid is None else dx * resid[1, l, i]
            d_hidden = torch.mm(d_ff, w_2)
            d_a1 = _relu_backward(d_hidden, hidden, 0)
            if hidden_mask is not None:
                d_a1 = d_a1 * hidden_mask[l, i]
            d_z2 = torch.mm(d_a1, w_1)
            dx = dx + _layer_norm_backward(d_z2, x1, (D,), mean2, rstd2, ln2_w, None, (True, False, False))[0]
            sg.ffn[l] = (d_ff, d_a1, d_z2)
            # The attention block
            a = attn_i[l]
            if a is not None:
                mean, rstd, _, qu, p, _, n, lo, hi = a
                d_att = dx if resid is None else dx * resid[0, l, i]
                d_o = torch.mm(d_att, w_o).view(BH, 1, dk)
                pd = p if attn_mask is None else p * masks.attn_mask(l, i, n)
                # $\frac{1}{\sqrt{d_k}} \delta \tilde P$ (the softmax's backward is linear: the scale goes first)
                d_pd = torch.baddbmm(no_input, d_o, values[g][:, lo:hi].transpose(1, 2), beta=0, alpha=scale)
                d_pd = d_pd.view(B, H, n)
                if attn_mask is not None:
                    d_pd = d_pd * masks.attn_mask(l, i, n)
                d_scores = torch._softmax_backward_data(d_pd, p, -1, p.dtype)
                d_qu = torch.bmm(d_scores.view(BH, 1, n), keys[g][:, lo:hi])
                outer.append((d_scores, pd, qu, d_o))
                # $\delta q = \delta (q + u) + \sum_j \delta A_{tj}\, p_{t-j}$
                d_q = d_qu.view(B, H, dk) + torch.bmm(d_scores.transpose(0, 1), pos_k[l][:, -n:]).transpose(0, 1)
                d_q = d_q.reshape(B, D)
                d_z = torch.mm(d_q, w_q)
                dx = dx + _layer_norm_backward(d_z, xs_i[l], (D,), mean, rstd, ln1_w, None, (True, False, False))[0]
                sg.attn[l] = (d_att, d_q, d_qu.view(B, H, dk), d_z, d_scores)
            if d_mem is not None:
                dx = torch.add(dx, d_mem, alpha=mem_ws[l])
        if outer:
            _add_cache_gradient(d_work_rows, outer, lo, hi, G, BH, dk)
        d_x_seq[i] = dx
        pending.append(sg)
        if len(pending) == chunk or i == 0:
            acc.add(s, pending, layers, cfg, D)
            pending = []

    d_prev = d_work[..., :n_prev, :] if n_prev else None
    d_mem_w = acc.mem_w if acc.mem_w is not None or not needs_input_grad[3] else torch.zeros_like(mem_w)
    return (d_x_seq, d_prev, d_mem_w, acc.kv_w, acc.kv_b, *[g for layer in acc.layers for g in layer])


def _add_cache_gradient(d_work_rows: torch.Tensor, outer: list, lo: int, hi: int, G: int, BH: int, dk: int) -> None:
    r"""
    $\delta k_j \mathrel{+}= \sum_l \delta A^l_{tj} (q^l_t + u^l)$ and
    $\delta v_j \mathrel{+}= \sum_l \tilde P^l_{tj}\, \delta o^l_t$ for the slots $j$ step $t$ saw, all layers in
    one batched product: with shared keys and values the sum over layers is the product's inner dimension, with
    per-layer ones each layer is a batch of its own.
    """
    n = hi - lo
    L = len(outer)
    # Bottom layer first, as the groups are stored
    outer = outer[::-1]
    if G == 1:
        # `[2 * BH, n, L] @ [2 * BH, L, d_k]`
        a = torch.stack([o[0] for o in outer] + [o[1] for o in outer]).view(2, L, BH, n)
        a = a.permute(0, 2, 3, 1).reshape(2 * BH, n, L)
        b = torch.stack([o[2] for o in outer] + [o[3] for o in outer]).view(2, L, BH, dk)
        b = b.permute(0, 2, 1, 3).reshape(2 * BH, L, dk)
    else:
        # `[L * 2 * BH, n, 1] @ [L * 2 * BH, 1, d_k]`, layer $l$'s keys and values at rows of group $l$
        a = torch.stack([x for o in outer for x in (o[0], o[1])]).view(L * 2 * BH, n, 1)
        b = torch.stack([x for o in outer for x in (o[2], o[3])]).view(L * 2 * BH, 1, dk)
    d_work_rows[:, lo:hi] += torch.bmm(a, b)


class _StepGrads:
    """The per-step gradients that weight gradients are made of."""

    def __init__(self, i: int, n_layers: int):
        self.i = i
        self.d_kv: Optional[torch.Tensor] = None
        self.d_mem: Optional[torch.Tensor] = None
        # Per layer: `(d_ff, d_a1, d_z2)`, and `(d_att, d_q, d_qu, d_z, d_scores)` or `None`
        self.ffn: list = [None] * n_layers
        self.attn: list = [None] * n_layers


class _WeightGrads:
    """Weight gradients, accumulated chunk by chunk with one product per weight."""

    def __init__(self, layers):
        self.layers = [[torch.zeros_like(t) for t in lt] for lt in layers]
        self.mem_w: Optional[torch.Tensor] = None
        self.kv_w: Optional[torch.Tensor] = None
        self.kv_b: Optional[torch.Tensor] = None

    @staticmethod
    def _add(current: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
        return new if current is None else current + new

    def add(self, s, steps: List[_StepGrads], layers, cfg, D: int) -> None:
        steps = steps[::-1]
        cat = torch.cat
        for l, lt in enumerate(layers):
            (_, u, pos_emb, _, _, _, ln1_w, ln1_b, ln2_w, ln2_b, _, _, _, _) = lt
            g = self.layers[l]
            # The feed-forward block: $\delta W_2 = \sum \delta f^\top h$, $\delta W_1 = \sum \delta a^\top z_2$, ...
            d_ff = cat([sg.ffn[l][0] for sg in steps])
            d_a1 = cat([sg.ffn[l][1] for sg in steps])
            d_z2 = cat([sg.ffn[l][2] for sg in steps])
            fs = [s.ffn[sg.i][l] for sg in steps]
            xhat2 = (cat([f.x1 for f in fs]) - cat([f.mean2 for f in fs])) * cat([f.rstd2 for f in fs])
            z2 = torch.addcmul(ln2_b, xhat2, ln2_w)
            g[12] = g[12] + torch.mm(d_ff.t(), cat([f.hidden for f in fs]))
            g[13] = g[13] + d_ff.sum(0)
            g[10] = g[10] + torch.mm(d_a1.t(), z2)
            g[11] = g[11] + d_a1.sum(0)
            g[8] = g[8] + (d_z2 * xhat2).sum(0)
            g[9] = g[9] + d_z2.sum(0)
            # The attention block, at steps that had memory
            att_steps = [sg for sg in steps if sg.attn[l] is not None]
            if not att_steps:
                continue
            ga = [sg.attn[l] for sg in att_steps]
            sa = [s.attn[sg.i][l] for sg in att_steps]
            d_att, d_q, d_qu, d_z = (cat([x[k] for x in ga]) for k in range(4))
            xhat = (cat([s.xs[sg.i][l] for sg in att_steps]) - cat([a.mean for a in sa])) * cat([a.rstd for a in sa])
            z = torch.addcmul(ln1_b, xhat, ln1_w)
            g[0] = g[0] + torch.mm(d_q.t(), z)
            g[1] = g[1] + d_qu.sum(0)
            g[4] = g[4] + torch.mm(d_att.t(), cat([a.o for a in sa]))
            g[5] = g[5] + d_att.sum(0)
            g[6] = g[6] + (d_z * xhat).sum(0)
            g[7] = g[7] + d_z.sum(0)
            # Position tables: score gradients right-aligned by distance, `[steps, B, H, N]`
            B, H = d_qu.shape[0] // len(ga), d_qu.shape[1]
            d_scores = d_q.new_zeros((len(ga), B, H, pos_emb.shape[0]))
            for k, x in enumerate(ga):
                d_scores[k, :, :, -x[4].shape[-1]:] = x[4]
            q = torch.stack([a.q for a in sa]).view(len(ga), B, H, -1)
            # $\delta p_\Delta = \sum_{t, b} \delta A_{t, t - \Delta}\, q_t$ and
            # $\delta s_\Delta = \sum_{t, b} \delta A_{t, t - \Delta}$
            g[2] = g[2] + torch.einsum('tbhn,tbhd->nhd', d_scores, q)
            g[3] = g[3] + d_scores.sum((0, 1)).t()
        # The memory: $\delta\, \mathrm{softmax}(w)_l = \sum_{t, b} \delta m_t \cdot x_t^l$,
        # $\delta W_{kv} = \sum_t \delta (k_t, v_t)^\top m_t$
        mem_steps = [sg for sg in steps if sg.d_mem is not None]
        if mem_steps:
            xs = torch.stack([torch.stack(s.xs[sg.i]) for sg in mem_steps])          # [n, L + 1, B, D]
            self.mem_w = self._add(self.mem_w, torch.einsum('tbd,tlbd->l', torch.stack([sg.d_mem for sg in mem_steps]),
                                                            xs))
            d_kv = cat([sg.d_kv for sg in mem_steps])
            mems = cat([s.mems[sg.i] for sg in mem_steps])
            if cfg.memory_norm:
                # The projection reads $\hat m_t$; $\delta b = \sum_t \delta (k_t, v_t)$
                mems = (mems - cat([s.mem_stats[sg.i][0] for sg in mem_steps])) \
                    * cat([s.mem_stats[sg.i][1] for sg in mem_steps])
                self.kv_b = self._add(self.kv_b, d_kv.sum(0))
            self.kv_w = self._add(self.kv_w, torch.mm(d_kv.t(), mems))
