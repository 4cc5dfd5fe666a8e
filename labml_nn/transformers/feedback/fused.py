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

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from labml_nn.transformers.feed_forward import FeedForward
from labml_nn.transformers.feedback.stack import first_visible, n_visible


class LoopConfig(NamedTuple):
    """What the loop needs besides tensors."""
    n_layers: int
    # Key/value groups of the cache: `n_layers` (per-layer projections) or 1 (shared)
    groups: int
    heads: int
    d_k: int
    # $\epsilon$ of the layers' norms
    eps: float
    # Attend to at most this many latest memory vectors (`None`: all)
    memory_span: Optional[int]
    # Dropout probabilities on attention probabilities, residual branches and hidden units (0 in eval mode)
    p_attn: float
    p_resid: float
    p_hidden: float
    # Absolute index of the first step, and whether the last step's memory is needed (by a later call)
    n_start: int
    make_last_memory: bool
    # Seed of the dropout masks (drawn from the global generator when training)
    seed: int
    # Whether memory vectors are normalized before their projection, and that norm's $\epsilon$
    memory_norm: bool = False
    memory_eps: float = 0.0
    # Under `torch.autocast`: the dtype of matrix products (`None`: the inputs' own)
    dtype: Optional[torch.dtype] = None


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


class LayerWeights(NamedTuple):
    """One layer's tensors, as the loop reads them (also the shape of their gradients)."""
    # $W_q$ `[D, D]` and the query position bias $u$ `[heads, d_k]`
    w_q: torch.Tensor
    u: torch.Tensor
    # The relative position terms for the distances of this call, $N \dots 1$: $p_\Delta$ `[N, heads, d_k]`,
    # $s_\Delta$ `[N, heads]`
    pos_emb: torch.Tensor
    pos_bias: torch.Tensor
    # $W_o, b_o$
    w_o: torch.Tensor
    b_o: torch.Tensor
    # Gains and biases of the pre-attention and pre-FFN layer norms
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    # The feed-forward network's $W_1, b_1, W_2, b_2$
    w_1: torch.Tensor
    b_1: torch.Tensor
    w_2: torch.Tensor
    b_2: torch.Tensor


# The tensors of `LayerWeights` that enter matrix products: cast to the products' dtype under autocast
PRODUCT_WEIGHTS = ('w_q', 'pos_emb', 'pos_bias', 'w_o', 'b_o', 'w_1', 'b_1', 'w_2', 'b_2')


def for_products(layer: LayerWeights, dtype: torch.dtype) -> LayerWeights:
    """`layer` with its matrix-product weights in `dtype` (the same tensors when they already are)."""
    if layer.w_q.dtype == dtype:
        return layer
    return layer._replace(**{k: getattr(layer, k).to(dtype) for k in PRODUCT_WEIGHTS})


class LoopShape(NamedTuple):
    """Sizes of one call: `T` steps of batch `B` and width `D`; the cache had `n_prev` entries and gets `n_new`."""
    T: int
    B: int
    D: int
    n_prev: int
    n_new: int
    # Absolute step of work-buffer slot 0
    first: int


class AttnSaved(NamedTuple):
    """What an attention block keeps for the backward pass."""
    # Statistics of $z = \mathrm{LN}(x)$
    mean: torch.Tensor
    rstd: torch.Tensor
    # $q$ `[B, D]`, $q + u$ `[B * H, 1, d_k]`, the probabilities $P$ `[B, H, n]` (before dropout) and the heads'
    # output $o$ `[B, D]`
    q: torch.Tensor
    qu: torch.Tensor
    p: torch.Tensor
    o: torch.Tensor


class FfnSaved(NamedTuple):
    """What a feed-forward block keeps: its input, normalisation statistics, hidden units after dropout."""
    x1: torch.Tensor
    mean2: torch.Tensor
    rstd2: torch.Tensor
    hidden: torch.Tensor


@dataclass
class StepRecord:
    """Everything the backward pass needs of one step."""
    # $x^0 \dots x^L$: the input of every layer, and the last layer's output
    xs: List[torch.Tensor]
    # Per layer; `attn[l]` is `None` at a step without memory (the first step of a sequence)
    attn: List[Optional[AttnSaved]]
    ffn: List[FfnSaved]
    # The work-buffer slots this step attended to: `lo .. hi - 1` (`hi` is this step's own slot)
    lo: int
    hi: int
    # $m_t$ and, with `memory_norm`, its statistics $(\mu, 1/\sigma)$; `None` when the memory was not made
    mem: Optional[torch.Tensor] = None
    mem_stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


class DropoutMasks:
    r"""
    Dropout masks, drawn at once for the whole call and scaled by $1 / (1 - p)$ (`None` where $p = 0$), so the
    backward pass multiplies by the same masks.
    """

    def __init__(self, cfg: LoopConfig, like: torch.Tensor, T: int, B: int, D: int, d_ff: int):
        gen = torch.Generator(device=like.device)
        gen.manual_seed(cfg.seed)
        L = cfg.n_layers
        # On the attention (`[0]`) and feed-forward (`[1]`) residual branches, `[2, L, T, B, D]`
        self.resid = self._draw((2, L, T, B, D), cfg.p_resid, like, gen)
        # On the hidden units, `[L, T, B, d_ff]`, in the products' dtype (the hidden units are a product's output)
        self.hidden = self._draw((L, T, B, d_ff), cfg.p_hidden, like, gen, cfg.dtype)
        # On the attention probabilities, right-aligned: step `i` uses the last `n` of `n_max` slots
        n_max = max(1, n_visible(cfg.n_start + T - 1, cfg.memory_span))
        self.attn = self._draw((L, T, B, cfg.heads, n_max), cfg.p_attn, like, gen)

    @staticmethod
    def _draw(shape, p: float, like: torch.Tensor, gen: torch.Generator,
              dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        if p == 0:
            return None
        # Keep with probability $1 - p$, scaled so that the expectation is unchanged (as `nn.Dropout`)
        keep = torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p, generator=gen)
        return keep.div_(1 - p).to(dtype or like.dtype)

    def attn_probs(self, l: int, i: int, n: int) -> torch.Tensor:
        """The mask of layer `l`'s attention probabilities at step `i`, which sees `n` slots: `[B, H, n]`."""
        # Right-aligned, like the position terms: the newest slot is always the last column
        return self.attn[l, i, :, :, -n:]


class _NoMasks:
    """No dropout (evaluation, inference)."""
    resid = hidden = attn = None


_NO_MASKS = _NoMasks()


def flatten_layers(layers: List[LayerWeights]) -> List[torch.Tensor]:
    """All layers' tensors in one list: `autograd.Function` tracks only tensors passed directly."""
    return [t for layer in layers for t in layer]


def split_layers(n_layers: int, flat) -> List[LayerWeights]:
    """The inverse of `flatten_layers`."""
    n = len(LayerWeights._fields)
    return [LayerWeights(*flat[l * n:(l + 1) * n]) for l in range(n_layers)]


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
        return _steps(cfg, x_seq, layers, mem_w, kv_w, kv_b, work, first, masks or _NO_MASKS, records)


def _steps(cfg: LoopConfig, x_seq: torch.Tensor, layers: List[LayerWeights], mem_w: torch.Tensor,
           kv_w: torch.Tensor, kv_b: Optional[torch.Tensor], work: torch.Tensor, first: int, masks,
           records: Optional[List[Optional[StepRecord]]]) -> torch.Tensor:
    T, B, D = x_seq.shape
    L, G, H, dk = cfg.n_layers, cfg.groups, cfg.heads, cfg.d_k
    BH = B * H
    n_new = T if cfg.make_last_memory else T - 1
    # Operands of matrix products in the products' dtype (a no-op outside autocast); the residual stream, norms
    # and softmax stay in `x_seq`'s dtype
    to_low = _caster(work.dtype, x_seq.dtype)
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


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _caster(dtype: torch.dtype, other: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that casts to `dtype`, or does nothing when `dtype` is `other` (outside autocast)."""
    return _same if dtype == other else (lambda t: t.to(dtype))


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
