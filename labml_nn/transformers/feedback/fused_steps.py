r"""
---
title: The fused loop's steps
summary: The step-by-step loop of a Feedback Transformer on plain tensors, without modules or autograd, and how
  a transformer hands it its weights and settings. Training and inference both run these steps.
---

# The fused loop's steps

This is the loop of [transformer.py](transformer.html) once more, on plain tensor operations: no modules, no
autograd graph. Both fast paths run it:

* **training** ([fused.py](fused.html)), inside one autograd function, keeping step by step what its
  hand-written backward pass needs: each layer's input, normalisation statistics, query, attention probabilities,
  hidden activations, and the dropout masks ([the records](fused_records.html));
* **inference** ([inference.py](inference.html)), keeping nothing and writing keys and values straight into the
  state's cache.

The steps read a transformer's tensors as they are: `loop_weights` gathers each layer's parameters into a
`LayerWeights` record (no copies), `loop_config` the settings into a `LoopConfig`, and `loop_inputs` all that a
call reads.

The keys and values live in a work buffer with [the cache's layout](state.html#layout),
`[groups, 2, batch_size, heads, time, d_k]`; slot 0 of the buffer is absolute step `first`, so a call that
continues a state starts with the state's cache in the buffer's first slots.

## Mixed precision

Under `torch.autocast` the steps follow autocast's rules explicitly (autocast itself is switched off inside, so
nothing is cast twice or per step): matrix products take their operands in autocast's low-precision dtype
(`cfg.dtype`, e.g. bfloat16), with every weight cast once per call (`for_products`); the residual stream, layer
norms, softmax and the weighted sum that makes the memory stay in the parameters' precision (float32), as
autocast would keep them; the cache holds low-precision keys and values, as the module loop's does.

## What the steps implement

The standard building blocks: `FeedForward` with ReLU, not gated, with biases; affine layer norms. `supports()`
says whether a layer qualifies; other configurations use the module loop. The tests compare both loops with a
naive reference in float64.
"""

from typing import Callable, List, NamedTuple, Optional, Protocol, Tuple

import torch
from torch import nn

from labml_nn.transformers.feed_forward import FeedForward
from labml_nn.transformers.feedback.fused_records import (
    NO_MASKS,
    AttnSaved,
    DropoutMasks,
    FfnSaved,
    LayerWeights,
    LoopConfig,
    StepRecord,
    caster,
    for_products,
    group_views,
)
from labml_nn.transformers.feedback.stack import first_visible, n_visible


class FeedbackModel(Protocol):
    """What the fast paths read from a Feedback Transformer ([transformer.py](transformer.html))."""
    layers: nn.ModuleList
    n_layers: int
    # Key/value groups of the cache: `n_layers` (per-layer projections) or 1 (shared)
    groups: int
    heads: int
    d_k: int
    memory_span: Optional[int]
    memory_norm: bool
    # The memory weights $w$ (their dtype is the parameters') and the final norm
    weights: torch.Tensor
    norm: nn.LayerNorm
    training: bool

    def memory_weights(self) -> torch.Tensor: ...

    def kv_projection(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]: ...

    def memory_eps(self) -> float: ...


def supports(layer: nn.Module) -> bool:
    """Whether the steps implement this layer's building blocks exactly."""
    ff = layer.feed_forward
    norms = (layer.norm_self_attn, layer.norm_ff)
    return (type(ff) is FeedForward and not ff.is_gated and type(ff.activation) is nn.ReLU
            and ff.layer1.bias is not None and ff.layer2.bias is not None
            and all(type(n) is nn.LayerNorm and n.elementwise_affine and n.bias is not None for n in norms))


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


def products_dtype(x_seq: torch.Tensor, params_dtype: torch.dtype) -> Optional[torch.dtype]:
    """Under `torch.autocast`: the dtype of matrix products, when it differs from the parameters'."""
    dtype = autocast_dtype(x_seq.device.type)
    return None if dtype == params_dtype else dtype


def widest_memory(n_start: int, seq_len: int, memory_span: Optional[int]) -> int:
    """
    The most memory slots a step of a call over steps `n_start .. n_start + seq_len - 1` sees: the last step's (at
    least one, so that position terms and dropout masks have a shape even when no step attends).
    """
    return max(1, n_visible(n_start + seq_len - 1, memory_span))


def loop_weights(model: FeedbackModel, n: int) -> List[LayerWeights]:
    """Each layer's tensors as the steps read them, with relative position terms for `n` memory slots."""
    weights = []
    for layer in model.layers:
        attn, ff = layer.attn, layer.feed_forward
        # $p_\Delta, s_\Delta$ for distances $n \dots 1$ (made with autograd when it is on: their gradients reach
        # the position tables through this gather)
        pos_emb, pos_bias = attn.relative_terms(n)
        # The parameters themselves (no copies): the fused loop's gradients for them are the parameters' own
        weights.append(LayerWeights(
            w_q=attn.query.linear.weight, u=attn.query_pos_bias, pos_emb=pos_emb, pos_bias=pos_bias,
            w_o=attn.output.weight, b_o=attn.output.bias,
            ln1_w=layer.norm_self_attn.weight, ln1_b=layer.norm_self_attn.bias,
            ln2_w=layer.norm_ff.weight, ln2_b=layer.norm_ff.bias,
            w_1=ff.layer1.weight, b_1=ff.layer1.bias, w_2=ff.layer2.weight, b_2=ff.layer2.bias))
    return weights


def loop_config(model: FeedbackModel, n_start: int, make_last_memory: bool, dropout: bool,
                dtype: Optional[torch.dtype]) -> LoopConfig:
    """The settings of a call that starts at absolute step `n_start`, with or without `dropout`."""
    # All layers are copies of one: the first one's settings are everyone's
    layer = model.layers[0]
    p_attn, p_resid, p_hidden = (layer.attn.dropout.p, layer.dropout.p, layer.feed_forward.dropout.p) \
        if dropout else (0.0, 0.0, 0.0)
    # The dropout masks' seed comes from the global generator, so `torch.manual_seed` reproduces a step
    seed = int(torch.randint(2 ** 62, ())) if max(p_attn, p_resid, p_hidden) > 0 else 0
    return LoopConfig(n_layers=model.n_layers, groups=model.groups, heads=model.heads, d_k=model.d_k,
                      eps=layer.norm_ff.eps, memory_span=model.memory_span, p_attn=p_attn, p_resid=p_resid,
                      p_hidden=p_hidden, n_start=n_start, make_last_memory=make_last_memory, seed=seed,
                      memory_norm=model.memory_norm, memory_eps=model.memory_eps(), dtype=dtype)


class LoopInputs(NamedTuple):
    """What a call of the loop reads from the transformer."""
    cfg: LoopConfig
    layers: List[LayerWeights]
    # $\mathrm{softmax}(w)$ `[L + 1]`, and the key/value projection of all groups (`FeedbackModel.kv_projection`)
    mem_w: torch.Tensor
    kv_w: torch.Tensor
    kv_b: Optional[torch.Tensor]


def loop_inputs(model: FeedbackModel, x_seq: torch.Tensor, n_start: int, make_last_memory: bool,
                dropout: bool) -> LoopInputs:
    """
    The settings and weights of a call over `x_seq` `[seq_len, batch_size, d_model]` from absolute step `n_start`,
    made from the parameters with autograd when it is on (so gradients reach them through ordinary nodes).
    """
    cfg = loop_config(model, n_start, make_last_memory, dropout, products_dtype(x_seq, model.weights.dtype))
    # Position terms for the most memory a step of the call sees
    layers = loop_weights(model, widest_memory(n_start, x_seq.shape[0], model.memory_span))
    kv_w, kv_b = model.kv_projection()
    return LoopInputs(cfg, layers, model.memory_weights(), kv_w, kv_b)


def weights_for_products(layers: List[LayerWeights], kv_w: torch.Tensor, kv_b: Optional[torch.Tensor],
                         dtype: torch.dtype) -> Tuple[List[LayerWeights], torch.Tensor, Optional[torch.Tensor]]:
    """The weights that enter matrix products, cast to `dtype` once per call (the same tensors when they are)."""
    return ([for_products(lw, dtype) for lw in layers], kv_w.to(dtype),
            None if kv_b is None else kv_b.to(dtype))


def run_steps(cfg: LoopConfig, x_seq: torch.Tensor, layers: List[LayerWeights], mem_w: torch.Tensor,
              kv_w: torch.Tensor, kv_b: Optional[torch.Tensor], work: torch.Tensor, first: int,
              masks: Optional[DropoutMasks] = None, records: Optional[List[Optional[StepRecord]]] = None,
              step: Optional[Callable[..., "StepOutput"]] = None) -> torch.Tensor:
    r"""
    The step loop, with plain tensor operations. Reads the cache from and writes new memory's keys and values
    into `work` (the cache's layout, slot 0 holding absolute step `first`), keeps what the backward pass needs
    in `records` (if given), and returns the last layer's outputs `[T, B, D]`.

    `layers`, `kv_w` and `kv_b` come with their product weights already in the products' dtype
    (`weights_for_products`), the work buffer in that dtype too. `step` runs one step in place of
    `feedback_step` (e.g. the same function compiled, [fused.py](fused.html#steps)).
    """
    # Autocast's rules are followed by hand below
    with torch.autocast(x_seq.device.type, enabled=False):
        return _steps(cfg, x_seq, layers, mem_w, kv_w, kv_b, work, first, masks or NO_MASKS, records,
                      step or feedback_step)


class StepViews(NamedTuple):
    """What every step of a call reads, arranged once per call for the step's products (views, no copies)."""
    # Each group's keys and values as `[B * H, time, d_k]` views of the work buffer
    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    # Relative position terms per layer, for batched products over heads: `pos_k [H, d_k, N]` and `pos_b [H, N]`
    # (distances $N \dots 1$ from left to right)
    pos_k: List[torch.Tensor]
    pos_b: List[torch.Tensor]
    # Transposed weights for `input @ W^T`: $W_q^\top, W_o^\top, W_1^\top, W_2^\top$ per layer, and $W_{kv}^\top$
    w_t: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    kv_w_t: torch.Tensor


def step_views(cfg: LoopConfig, layers: List[LayerWeights], kv_w: torch.Tensor, work: torch.Tensor) -> StepViews:
    """The `StepViews` of a call over the work buffer `work` `[groups, 2, B, H, time, d_k]`."""
    keys, values = group_views(work, cfg.heads, cfg.d_k)
    return StepViews(keys=keys, values=values,
                     pos_k=[lw.pos_emb.permute(1, 2, 0) for lw in layers],
                     pos_b=[lw.pos_bias.t() for lw in layers],
                     w_t=[(lw.w_q.t(), lw.w_o.t(), lw.w_1.t(), lw.w_2.t()) for lw in layers],
                     kv_w_t=kv_w.t())


def _steps(cfg: LoopConfig, x_seq: torch.Tensor, layers: List[LayerWeights], mem_w: torch.Tensor,
           kv_w: torch.Tensor, kv_b: Optional[torch.Tensor], work: torch.Tensor, first: int, masks,
           records: Optional[List[Optional[StepRecord]]], step: Callable[..., "StepOutput"]) -> torch.Tensor:
    T = x_seq.shape[0]
    n_new = T if cfg.make_last_memory else T - 1
    views = step_views(cfg, layers, kv_w, work)
    outputs = []
    for i in range(T):
        t = cfg.n_start + i
        # The slots step $t$ attends to (the same for every layer): `lo .. hi - 1`; slot `hi` is its own
        lo, hi = first_visible(t, cfg.memory_span) - first, t - first
        out = step(cfg, x_seq[i], i, lo, hi, layers, views, mem_w, kv_b, masks, i < n_new)
        outputs.append(out.x)
        if out.kv is not None:
            # $m_t$'s keys and values for every group, into slot `hi`
            work[..., hi, :] = out.kv
        if records is not None:
            records[i] = StepRecord(out.xs, out.attn, out.ffn, lo, hi, out.mem, out.mem_stats)
    return torch.stack(outputs)


class StepOutput(NamedTuple):
    """What `feedback_step` returns."""
    # $x_t^L$ `[B, D]`
    x: torch.Tensor
    # What the backward pass keeps ([`StepRecord`](fused_records.html)): every layer's input and the last output,
    # each attention (`None` without memory) and feed-forward block's saved values
    xs: List[torch.Tensor]
    attn: List[Optional[AttnSaved]]
    ffn: List[FfnSaved]
    # $m_t$, its statistics with `memory_norm`, and its keys and values for every group `[G, 2, B, H, d_k]`; all
    # `None` at a step whose memory is not made
    mem: Optional[torch.Tensor]
    mem_stats: Optional[Tuple[torch.Tensor, torch.Tensor]]
    kv: Optional[torch.Tensor]


def feedback_step(cfg: LoopConfig, x: torch.Tensor, i: int, lo: int, hi: int, layers: List[LayerWeights],
                  views: StepViews, mem_w: torch.Tensor, kv_b: Optional[torch.Tensor], masks,
                  make_memory: bool) -> StepOutput:
    r"""
    Step `i` of the call, from its embedding $x_t^0$ `x` `[B, D]`, attending to the work buffer's slots
    `lo .. hi - 1`: every layer, then (if `make_memory`) the memory $m_t$ and its keys and values. The function has
    no side effects and reads only its arguments, so that `torch.compile` can compile it whole.
    """
    B, D = x.shape
    H, dk = cfg.heads, cfg.d_k
    BH = B * H
    n = hi - lo
    # Operands of matrix products in the products' dtype (a no-op outside autocast); the residual stream, norms
    # and softmax stay in `x`'s dtype
    high = x.dtype
    to_low = caster(views.kv_w_t.dtype, high)
    scale = 1 / dk ** 0.5
    xs, attn_saved, ffn_saved = [x], [], []
    for l, lw in enumerate(layers):
        w_q_t, w_o_t, w_1_t, w_2_t = views.w_t[l]
        g = l if cfg.groups > 1 else 0
        if n > 0:
            # $q = W_q\, \mathrm{LN}(x)$ and $q + u$
            mean, rstd, q, qu = attention_query(x, lw, w_q_t, cfg, to_low)
            # $(q + u)^\top k_j$ for all $j$: `[B * H, 1, n]`
            content = torch.bmm(qu, views.keys[g][:, lo:hi].transpose(1, 2))
            # $\frac{1}{\sqrt{d_k}}(q^\top p_\Delta + s_\Delta)$, one product per head: `[H, B, n]`
            position = torch.baddbmm(views.pos_b[l][:, None, -n:], q.view(B, H, dk).transpose(0, 1),
                                     views.pos_k[l][:, :, -n:], beta=scale, alpha=scale)
            # All scores, scaled, and $P = \mathrm{softmax}_j$ (in the high precision): `[B, H, n]`
            scores = torch.add(position.transpose(0, 1), content.view(B, H, n), alpha=scale)
            p = torch.softmax(scores, dim=-1, dtype=high)
            # $\tilde P$: dropout on the probabilities
            pd = p if masks.attn is None else p * masks.attn_probs(l, i, n)
            # $o = \sum_j \tilde P_j v_j$, heads concatenated: `[B, D]`
            o = torch.bmm(to_low(pd).view(BH, 1, n), views.values[g][:, lo:hi]).view(B, D)
            # $x_1 = x + \mathrm{Drop}(W_o o + b_o)$
            att = torch.addmm(lw.b_o, o, w_o_t)
            x1 = x + att if masks.resid is None else torch.addcmul(x, att, masks.resid[0, l, i])
            attn_saved.append(AttnSaved(mean, rstd, q, qu, p, o))
        else:
            # The first step of a sequence has no memory to attend to
            x1 = x
            attn_saved.append(None)
        # The feed-forward block
        x, saved = feed_forward(x1, lw, w_1_t, w_2_t, cfg, to_low,
                                None if masks.hidden is None else masks.hidden[l, i],
                                None if masks.resid is None else masks.resid[1, l, i])
        ffn_saved.append(saved)
        xs.append(x)
    if not make_memory:
        return StepOutput(x, xs, attn_saved, ffn_saved, None, None, None)
    # $m_t$ and its keys and values for every group
    mem, mem_stats, kv = memory_entry(cfg, xs, mem_w, views.kv_w_t, kv_b, to_low)
    return StepOutput(x, xs, attn_saved, ffn_saved, mem, mem_stats, kv)


# The parts of a step that do not depend on how much memory it sees: the compiled step
# ([static_step.py](static_step.html)) runs them too.

class Products(NamedTuple):
    r"""
    How a step multiplies rows by a matrix: `mm(a, b)` $= ab$ and `addmm(c, a, b)` $= c + ab$. The loop calls the
    library's matrix products; [the compiled step](static_step.html) of a single row writes them as sums that the
    compiler fuses with the operations around them.
    """
    mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    addmm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


MATRIX_PRODUCTS = Products(torch.mm, torch.addmm)


def attention_query(x: torch.Tensor, lw: LayerWeights, w_q_t: torch.Tensor, cfg: LoopConfig,
                    to_low: Callable[[torch.Tensor], torch.Tensor],
                    products: Products = MATRIX_PRODUCTS) -> Tuple[torch.Tensor, ...]:
    r"""
    $z = \mathrm{LN}(x)$ and $q = W_q z$ of `x` `[B, D]`: the norm's statistics, $q$ `[B, D]` and $q + u$
    `[B * H, 1, d_k]` (in the products' dtype).
    """
    B, D = x.shape
    z, mean, rstd = torch.native_layer_norm(x, (D,), lw.ln1_w, lw.ln1_b, cfg.eps)
    q = products.mm(to_low(z), w_q_t)
    qu = to_low((q.view(B, cfg.heads, cfg.d_k) + lw.u).view(B * cfg.heads, 1, cfg.d_k))
    return mean, rstd, q, qu


def feed_forward(x1: torch.Tensor, lw: LayerWeights, w_1_t: torch.Tensor, w_2_t: torch.Tensor, cfg: LoopConfig,
                 to_low: Callable[[torch.Tensor], torch.Tensor], hidden_mask: Optional[torch.Tensor] = None,
                 resid_mask: Optional[torch.Tensor] = None,
                 products: Products = MATRIX_PRODUCTS) -> Tuple[torch.Tensor, FfnSaved]:
    r"""
    $x = x_1 + \mathrm{Drop}(W_2\, \mathrm{Drop}(\mathrm{ReLU}(W_1 \mathrm{LN}(x_1) + b_1)) + b_2)$, `[B, D]`, with the
    given dropout masks (`None`: no dropout), and what the backward pass keeps of it.
    """
    z2, mean2, rstd2 = torch.native_layer_norm(x1, (x1.shape[1],), lw.ln2_w, lw.ln2_b, cfg.eps)
    hidden = torch.relu_(products.addmm(lw.b_1, to_low(z2), w_1_t))
    if hidden_mask is not None:
        hidden = hidden * hidden_mask
    ff = products.addmm(lw.b_2, hidden, w_2_t)
    x = x1 + ff if resid_mask is None else torch.addcmul(x1, ff, resid_mask)
    return x, FfnSaved(x1, mean2, rstd2, hidden)


def memory_entry(cfg: LoopConfig, xs: List[torch.Tensor], mem_w: torch.Tensor, kv_w_t: torch.Tensor,
                 kv_b: Optional[torch.Tensor], to_low: Callable[[torch.Tensor], torch.Tensor],
                 products: Products = MATRIX_PRODUCTS):
    r"""
    The step's memory $m_t = \sum_l \mathrm{softmax}(w)_l x_t^l$ `[B, D]` from the layers' inputs and output `xs`,
    with `memory_norm` its statistics $(\mu, 1/\sigma)$ (else `None`), and its keys and values for every group as a
    cache entry `[G, 2, B, H, d_k]`.
    """
    L, G, H, dk = cfg.n_layers, cfg.groups, cfg.heads, cfg.d_k
    B, D = xs[0].shape
    # One product over the stacked layer outputs (high precision)
    mem = products.mm(mem_w.view(1, L + 1), torch.stack(xs).view(L + 1, B * D)).view(B, D)
    stats = None
    if cfg.memory_norm:
        # $\hat m_t = (m_t - \mu) / \sigma$; the norms' gains and biases are folded into `kv_w`, `kv_b`
        # ([transformer.py](transformer.html#_FeedbackLoop.kv_projection))
        mem_hat, mem_mean, mem_rstd = torch.native_layer_norm(mem, (D,), None, None, cfg.memory_eps)
        stats = (mem_mean, mem_rstd)
        kv = products.addmm(kv_b, to_low(mem_hat), kv_w_t)
    else:
        kv = products.mm(to_low(mem), kv_w_t)
    # `[B, G, 2, H, d_k]` to the cache's layout
    return mem, stats, kv.view(B, G, 2, H, dk).permute(1, 2, 0, 3, 4)
