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

This module computes exactly the same function as `transformer.py`, but as **one** `torch.autograd.Function`:

* **Forward:** the loop of `transformer.py` with raw tensor operations (no modules, no graph). It keeps what the
  backward pass needs: each layer's inputs, normalisation statistics, queries, attention probabilities,
  hidden activations and dropout masks.
* **Backward:** backpropagation through time by hand, from the last step to the first. Step $t$ first turns the
  (now complete) gradient of its keys and values into the gradient of its memory vector
  $\frac{\partial \mathcal{L}}{\partial m_t} = \frac{\partial \mathcal{L}}{\partial (k_t, v_t)} W_{kv}$,
  which flows to every $x_t^l$ with weight $\mathrm{softmax}(w)_l$; then it walks down the layers.
  Attention at step $t$ adds gradients to the keys and values of earlier steps, in one buffer.
* **Weight gradients are batched:** a weight gradient is a sum over steps, e.g.
  $\frac{\partial \mathcal{L}}{\partial W_q} = \sum_t \delta q_t^\top z_t$. Inside the loop we only store
  $\delta q_t$; every few steps one matrix product over all their rows (steps $\times$ batch) adds them up.

Without autograd (evaluation, generation) `run_steps` alone runs: the same steps, keeping nothing, writing keys and
values straight into the state's cache.

The cache lives in a work buffer `[groups, 2, batch_size, heads, time, d_k]`: time on the second-to-last axis
makes each head's keys one contiguous matrix, the layout batched matrix products like best.

It supports the standard building blocks (`FeedForward` with ReLU, not gated, with biases); other
configurations use the autograd loop. The tests compare both loops with a naive reference, and
`torch.autograd.gradcheck` checks this backward pass, dropout included.
"""

from typing import List, NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from labml_nn.transformers.feedback.fused_backward import backward_loop

# The per-layer tensors, in the order they are passed to `FeedbackLoopFunction`
LAYER_TENSORS = ('w_q', 'u', 'pos_emb', 'pos_bias', 'w_o', 'b_o', 'ln1_w', 'ln1_b', 'ln2_w', 'ln2_b',
                 'w_1', 'b_1', 'w_2', 'b_2')
N_LAYER_TENSORS = len(LAYER_TENSORS)



class LoopConfig(NamedTuple):
    """What the loop needs besides tensors."""
    n_layers: int
    groups: int
    heads: int
    d_k: int
    eps: float
    # Memory span (`None`: unlimited)
    window: Optional[int]
    # Dropout probabilities on attention, residuals and hidden units (0 in eval mode)
    p_attn: float
    p_resid: float
    p_hidden: float
    # Absolute index of the first step, and whether the last step's memory is needed
    n_start: int
    make_last_memory: bool
    # Seed of the dropout masks (drawn from the global generator when training)
    seed: int
    # Whether memory vectors are normalized before their projection, and the norm's $\epsilon$
    memory_norm: bool = False
    memory_eps: float = 0.0


def _visible(cfg: LoopConfig, t: int) -> int:
    # Index of the first memory slot that step `t` sees
    return 0 if cfg.window is None else max(0, t - cfg.window)


class FeedbackLoopFunction(torch.autograd.Function):
    r"""
    Inputs: `cfg`, `x_seq [T, B, D]`, `prev` (the visible cache before this call,
    `[groups, 2, B, heads, n_prev, d_k]`, possibly empty), `mem_w` ($\mathrm{softmax}(w)$, `[L + 1]`),
    `kv_w [groups * 2 * D, D]`, `kv_b [groups * 2 * D]` (or `None` without `memory_norm`), then
    `N_LAYER_TENSORS` tensors per layer.

    Outputs: the last layer's outputs `[T, B, D]` (before the final norm) and the cache this call can see and
    made, `[groups, 2, B, heads, n_prev + n_new, d_k]` (the work buffer).
    """

    @staticmethod
    def forward(ctx, cfg: LoopConfig, x_seq: torch.Tensor, prev: torch.Tensor, mem_w: torch.Tensor,
                kv_w: torch.Tensor, kv_b: Optional[torch.Tensor], *layer_tensors: torch.Tensor):
        T, B, D = x_seq.shape
        n_prev = prev.shape[4]
        n_new = T if cfg.make_last_memory else T - 1
        # Absolute index of work-buffer slot 0
        first = cfg.n_start - n_prev
        # The work buffer, `[groups, 2, B, H, time, d_k]`, starting with the cache of earlier calls
        work = x_seq.new_empty((cfg.groups, 2, B, cfg.heads, n_prev + n_new, cfg.d_k))
        work[..., :n_prev, :] = prev
        layers = split_layers(cfg, layer_tensors)
        masks = _Masks(cfg, x_seq, T, cfg.n_layers, B, D, layers[0][10].shape[0])
        saved = _Saved(T)
        out = run_steps(cfg, x_seq, layers, mem_w, kv_w, kv_b, work, first, masks, saved)
        ctx.cfg, ctx.saved, ctx.masks, ctx.shape = cfg, saved, masks, (T, B, D, n_prev, n_new, first)
        ctx.has_kv_b = kv_b is not None
        ctx.save_for_backward(x_seq, mem_w, kv_w, work, *layer_tensors)
        return out, work

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: torch.Tensor, d_work: Optional[torch.Tensor]):
        x_seq, mem_w, kv_w, work, *layer_tensors = ctx.saved_tensors
        grads = backward_loop(ctx.cfg, ctx.saved, ctx.masks, ctx.shape, d_out, d_work, x_seq, mem_w, kv_w, work,
                              split_layers(ctx.cfg, layer_tensors), ctx.needs_input_grad)
        d_x_seq, d_prev, d_mem_w, d_kv_w, d_kv_b, *d_layers = grads
        return (None, d_x_seq, d_prev, d_mem_w, d_kv_w, d_kv_b if ctx.has_kv_b else None, *d_layers)


def split_layers(cfg: LoopConfig, layer_tensors) -> list:
    """The flat list of layer tensors as one tuple per layer."""
    return [tuple(layer_tensors[i * N_LAYER_TENSORS:(i + 1) * N_LAYER_TENSORS]) for i in range(cfg.n_layers)]


def run_steps(cfg: LoopConfig, x_seq: torch.Tensor, layers: list, mem_w: torch.Tensor, kv_w: torch.Tensor,
              kv_b: Optional[torch.Tensor], work: torch.Tensor, first: int, masks: Optional["_Masks"] = None,
              saved: Optional["_Saved"] = None) -> torch.Tensor:
    r"""
    The step loop, with plain tensor operations. Reads the cache from and writes new memory's keys and values
    into `work` (`[groups, 2, B, heads, time, d_k]`, slot 0 holding absolute step `first`), keeps what the
    backward pass needs in `saved` (if given), and returns the last layer's outputs `[T, B, D]`.
    """
    T, B, D = x_seq.shape
    L, G, H, dk = cfg.n_layers, cfg.groups, cfg.heads, cfg.d_k
    BH = B * H
    n_new = T if cfg.make_last_memory else T - 1
    masks = masks or _NO_MASKS
    keys = [work[g, 0].view(BH, -1, dk) for g in range(G)]
    values = [work[g, 1].view(BH, -1, dk) for g in range(G)]
    # Relative position terms, arranged for batched products over heads:
    # `pos_k [H, d_k, N]` and `pos_b [H, N]` (distance $N \dots 1$ from left to right)
    pos_k = [lt[2].permute(1, 2, 0) for lt in layers]
    pos_b = [lt[3].t() for lt in layers]
    # Transposed weights (views) for `input @ W^T`
    w_t = [[lt[k].t() for k in (0, 4, 10, 12)] for lt in layers]
    scale = 1 / dk ** 0.5
    s = saved
    outputs = []
    kv_w_t = kv_w.t()
    for i in range(T):
        t = cfg.n_start + i
        lo, hi = _visible(cfg, t) - first, t - first
        n = hi - lo
        x = x_seq[i]
        xs, attn_saved, ffn_saved = [x], [], []
        for l, (_, u, _, _, _, b_o, ln1_w, ln1_b, ln2_w, ln2_b, _, b_1, _, b_2) in enumerate(layers):
            w_q_t, w_o_t, w_1_t, w_2_t = w_t[l]
            g = l if G > 1 else 0
            if n > 0:
                # $z = \mathrm{LN}(x)$ and $q = W_q z$
                z, mean, rstd = torch.native_layer_norm(x, (D,), ln1_w, ln1_b, cfg.eps)
                q = torch.mm(z, w_q_t)
                # $(q + u)^\top k_j$ for all $j$: `[B * H, 1, n]`
                qu = (q.view(B, H, dk) + u).view(BH, 1, dk)
                content = torch.bmm(qu, keys[g][:, lo:hi].transpose(1, 2))
                # $\frac{1}{\sqrt{d_k}}(q^\top p_\Delta + s_\Delta)$: `[H, B, n]`
                position = torch.baddbmm(pos_b[l][:, None, -n:], q.view(B, H, dk).transpose(0, 1),
                                         pos_k[l][:, :, -n:], beta=scale, alpha=scale)
                # All scores, scaled, and the softmax over $j$: `[B, H, n]`
                scores = torch.add(position.transpose(0, 1), content.view(B, H, n), alpha=scale)
                p = torch.softmax(scores, dim=-1)
                pd = p if masks.attn is None else p * masks.attn_mask(l, i, n)
                # $\sum_j p_j v_j$, heads concatenated: `[B, D]`
                o = torch.bmm(pd.view(BH, 1, n), values[g][:, lo:hi]).view(B, D)
                att = torch.addmm(b_o, o, w_o_t)
                x1 = x + att if masks.resid is None else torch.addcmul(x, att, masks.resid[0, l, i])
                attn_saved.append(AttnSaved(mean, rstd, q, qu, p, o, n, lo, hi))
            else:
                x1 = x
                attn_saved.append(None)
            # The feed-forward block
            z2, mean2, rstd2 = torch.native_layer_norm(x1, (D,), ln2_w, ln2_b, cfg.eps)
            hidden = torch.relu_(torch.addmm(b_1, z2, w_1_t))
            if masks.hidden is not None:
                hidden = hidden * masks.hidden[l, i]
            ff = torch.addmm(b_2, hidden, w_2_t)
            x = x1 + ff if masks.resid is None else torch.addcmul(x1, ff, masks.resid[1, l, i])
            ffn_saved.append(FfnSaved(x1, mean2, rstd2, hidden))
            xs.append(x)
        if s is not None:
            s.xs[i], s.attn[i], s.ffn[i] = xs, attn_saved, ffn_saved
        outputs.append(x)
        if i < n_new:
            # $m_t = \sum_l \mathrm{softmax}(w)_l x_t^l$ and its keys and values
            mem = torch.mm(mem_w.view(1, L + 1), torch.stack(xs).view(L + 1, B * D)).view(B, D)
            if cfg.memory_norm:
                # $\hat m_t = (m_t - \mu) / \sigma$; the norms' gains and biases are folded into `kv_w`, `kv_b`
                mem_hat, mem_mean, mem_rstd = torch.native_layer_norm(mem, (D,), None, None, cfg.memory_eps)
                kv = torch.addmm(kv_b, mem_hat, kv_w_t).view(B, G, 2, H, dk)
            else:
                kv = torch.mm(mem, kv_w_t).view(B, G, 2, H, dk)
            work[..., hi, :] = kv.permute(1, 2, 0, 3, 4)
            if s is not None:
                s.mems[i] = mem
                if cfg.memory_norm:
                    s.mem_stats[i] = (mem_mean, mem_rstd)

    return torch.stack(outputs)


class AttnSaved(NamedTuple):
    """What an attention block keeps for the backward pass."""
    mean: torch.Tensor
    rstd: torch.Tensor
    q: torch.Tensor
    qu: torch.Tensor
    p: torch.Tensor
    o: torch.Tensor
    n: int
    lo: int
    hi: int


class FfnSaved(NamedTuple):
    """What a feed-forward block keeps: its input, normalisation statistics, hidden units after dropout."""
    x1: torch.Tensor
    mean2: torch.Tensor
    rstd2: torch.Tensor
    hidden: torch.Tensor


class _Saved:
    """What the forward pass keeps for the backward pass, per step (released step by step by the backward pass)."""

    def __init__(self, T: int):
        # `xs[i][l]`: input of layer `l` at step `i` (`xs[i][L]`: the output)
        self.xs: List[Optional[List[torch.Tensor]]] = [None] * T
        # `attn[i][l]`: `AttnSaved` (`None` at a step without memory); `ffn[i][l]`: `FfnSaved`
        self.attn: List[Optional[list]] = [None] * T
        self.ffn: List[Optional[list]] = [None] * T
        # Memory vectors $m_t$ and, with `memory_norm`, their normalization statistics $(\mu, 1 / \sigma)$
        self.mems: List[Optional[torch.Tensor]] = [None] * T
        self.mem_stats: List[Optional[tuple]] = [None] * T


class _Masks:
    """Dropout masks, drawn at once for the whole call and scaled by $1 / (1 - p)$."""

    def __init__(self, cfg: LoopConfig, like: torch.Tensor, T: int, L: int, B: int, D: int, d_ff: int):
        gen = torch.Generator(device=like.device)
        gen.manual_seed(cfg.seed)
        self.resid = self._draw((2, L, T, B, D), cfg.p_resid, like, gen)
        self.hidden = self._draw((L, T, B, d_ff), cfg.p_hidden, like, gen)
        n_max = max(1, cfg.n_start + T - 1 if cfg.window is None else min(cfg.window, cfg.n_start + T - 1))
        self.attn = self._draw((L, T, B, cfg.heads, n_max), cfg.p_attn, like, gen)

    @staticmethod
    def _draw(shape, p: float, like: torch.Tensor, gen: torch.Generator) -> Optional[torch.Tensor]:
        if p == 0:
            return None
        keep = torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p, generator=gen)
        return keep.div_(1 - p)

    def attn_mask(self, l: int, i: int, n: int) -> torch.Tensor:
        return self.attn[l, i, :, :, -n:]


class _NoMasks:
    """No dropout (inference)."""
    resid = hidden = attn = None


_NO_MASKS = _NoMasks()


def run_loop(cfg: LoopConfig, x_seq: torch.Tensor, prev: Optional[torch.Tensor], mem_w: torch.Tensor,
             kv_w: torch.Tensor, kv_b: Optional[torch.Tensor], layer_tensors: List[torch.Tensor]):
    """Run `FeedbackLoopFunction`; `prev` may be `None` (empty cache), `kv_b` is `None` without `memory_norm`."""
    if prev is None:
        prev = x_seq.new_empty((cfg.groups, 2, x_seq.shape[1], cfg.heads, 0, cfg.d_k))
    return FeedbackLoopFunction.apply(cfg, x_seq, prev, mem_w, kv_w, kv_b, *layer_tensors)


def supports(layer) -> bool:
    """Whether the fused loop implements this layer's building blocks exactly."""
    from labml_nn.transformers.feed_forward import FeedForward
    ff = layer.feed_forward
    return (type(ff) is FeedForward and not ff.is_gated and type(ff.activation) is torch.nn.ReLU
            and ff.layer1.bias is not None and ff.layer2.bias is not None
            and type(layer.norm_self_attn) is torch.nn.LayerNorm and layer.norm_self_attn.elementwise_affine
            and layer.norm_self_attn.bias is not None)

