r"""
---
title: The fused loop's named structures
summary: What the fused training loop reads and keeps - its configuration, each layer's weights, the sizes of a
  call, what every step saves for the backward pass, and the dropout masks - as named tuples and classes.
---

# The fused loop's named structures

[The fused loop's steps](fused_steps.html) run the Feedback Transformer on plain tensors, and
[its backward pass](fused_backward.html) walks them in reverse. Both read the same records, named here so that
each line of the loop can be checked against the math by name (`layer.w_q`, `saved.p`) and not by position:

* `LoopConfig`: everything the loop needs besides tensors (sizes, dropout, the memory span, the precision);
* `LayerWeights`: one layer's tensors, and the shape of their gradients;
* `LoopShape`: the sizes of one call, and where the work buffer starts;
* `AttnSaved`, `FfnSaved`, `StepRecord`: what one step keeps for the backward pass;
* `DropoutMasks`: the masks of the whole call, drawn once so that the backward pass reuses them.
"""

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch

# ## The loop's settings and weights


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


def group_views(work: torch.Tensor, heads: int, d_k: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Each key/value group's keys and values as `[B * heads, time, d_k]` views of the work buffer `work`."""
    BH = work.shape[2] * heads
    return ([work[g, 0].view(BH, -1, d_k) for g in range(work.shape[0])],
            [work[g, 1].view(BH, -1, d_k) for g in range(work.shape[0])])


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


# ## What a step keeps for the backward pass


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


# ## Dropout masks, drawn once for the whole sequence


class DropoutMasks:
    r"""
    Dropout masks, drawn at once for the whole call and scaled by $1 / (1 - p)$ (`None` where $p = 0$), so the
    backward pass multiplies by the same masks.
    """

    def __init__(self, cfg: LoopConfig, like: torch.Tensor, T: int, B: int, D: int, d_ff: int, *, n_max: int):
        gen = torch.Generator(device=like.device)
        gen.manual_seed(cfg.seed)
        L = cfg.n_layers
        # On the attention (`[0]`) and feed-forward (`[1]`) residual branches, `[2, L, T, B, D]`
        self.resid = self._draw((2, L, T, B, D), cfg.p_resid, like, gen)
        # On the hidden units, `[L, T, B, d_ff]`, in the products' dtype (the hidden units are a product's output)
        self.hidden = self._draw((L, T, B, d_ff), cfg.p_hidden, like, gen, cfg.dtype)
        # On the attention probabilities, right-aligned: step `i` uses the last `n` of `n_max` slots (`n_max`: the
        # most memory a step of the call sees)
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


NO_MASKS = _NoMasks()


# ## Precision, and weights as one flat list


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def caster(dtype: torch.dtype, other: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that casts to `dtype`, or does nothing when `dtype` is `other` (outside autocast)."""
    return _same if dtype == other else (lambda t: t.to(dtype))


def flatten_layers(layers: List[LayerWeights]) -> List[torch.Tensor]:
    """All layers' tensors in one list: `autograd.Function` tracks only tensors passed directly."""
    return [t for layer in layers for t in layer]


def split_layers(n_layers: int, flat) -> List[LayerWeights]:
    """The inverse of `flatten_layers`."""
    n = len(LayerWeights._fields)
    return [LayerWeights(*flat[l * n:(l + 1) * n]) for l in range(n_layers)]
