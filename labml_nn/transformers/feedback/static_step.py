r"""
---
title: One step over fixed shapes
summary: A Feedback Transformer step whose tensors have the same shapes at every step - attention over the whole
  preallocated cache with the slots a step may not see masked out - so that torch.compile builds it once and a
  GPU can replay it as a CUDA graph; and generation's whole per-token work as one compiled call.
---

# One step over fixed shapes

[The fused loop's steps](fused_steps.html) attend over the `n` memory slots that step $t$ sees, a slice whose
length grows with $t$, and skip attention at the first step of a sequence. Both are right, and both make every step
a differently shaped computation: a compiler would specialise on `n` (and recompile at every step), a CUDA graph
could not be replayed.

Here a step attends over **every slot of the cache buffer**, whose capacity $C$ stays fixed between the times the
state's cache grows ([stack.py](stack.html), by doubling), and masks the slots it may not see. For the slot range
`lo .. hi - 1` of step $t$ (slot `hi` will hold its own memory; `hi - lo` $= n$):

* $\text{valid}_j = [\mathrm{lo} \le j < \mathrm{hi}]$, and the scores of other slots are $-\infty$, so their
  probabilities are exactly $0$;
* slot $j$ is at distance $\Delta_j = \mathrm{hi} - j$, and its position terms $q^\top p_{\Delta_j} + s_{\Delta_j}$
  are column $C - \Delta_j$ of the position products over the table of distances $C \dots 1$: one gather with an
  index computed from `hi`;
* at the first step no slot is valid; the softmax of $-\infty$ everywhere is undefined, so the probabilities are
  set to $0$ where nothing is valid, and the attention branch is multiplied by $[\mathrm{hi} > \mathrm{lo}]$, which
  leaves $x_1 = x$ as the loop's skipped attention does.

`lo` and `hi` enter as a tensor, not as Python numbers, so nothing in the step depends on the data: the same
compiled code runs every step. The products are those of the loop, with $C$ in place of $n$ for the two products
over the memory (and their entries in the masked slots multiply zeros).

Unwritten slots of a cache buffer are zeros (the stack makes its buffers so), so that the masked probabilities
$0$ never meet a NaN in the values. The query, the feed-forward block and the memory entry are
[the loop's own](fused_steps.html#attention_query); only the attention over the memory is written here again,
over fixed shapes.

## One row

Generating text runs one sequence (batch 1), and each of the step's matrix products is then one row times a
matrix: a few thousand multiply-adds, which the library's matrix product spends more time calling than computing.
For a single row the step writes them as sums, $(ab)_j = \sum_k a_k b_{kj}$ (`ROW_SUMS`), which the compiler turns
into loops fused with the norms, biases and activations around them. Larger batches keep the matrix products.

## Decoding: one compiled call per token

<a id="decoding"></a>

Generating text ([autoregressive.py](autoregressive.html)) feeds one token at a time from the cached state:

$$\text{token} \xrightarrow{\ \text{embedding}\ } x_t^0 \xrightarrow{\ \text{step } t\ } x_t^L
  \xrightarrow{\ \mathrm{LN}\ } \xrightarrow{\ \text{head}\ } \text{logits}.$$

At batch 1 and the README's sizes the step is a few hundred thousand multiply-adds: microseconds of arithmetic.
Through the modules a token costs far more than that, and mostly not in the step: the model's and the
transformer's `forward` check their inputs, set up the call's settings, reserve room in the cache, make a state,
and run the embedding, the final norm and the head as separate operations. With `compile=` on, the compiled step
(above) took less than half of a token's time (profiled at batch 1, README size).

`TokenDecoder` does the same work in **one compiled function per token**, `token_step`: embedding lookup, the
fixed-shape step (attention over the whole cache buffer, invisible slots masked), $\mathrm{LN}(x_t^L)$ and the
head's logits. Around it, per token, only what cannot be compiled stays in Python: reserving the token's slot in
the cache ([the stack](stack.html)), the slot bounds as a small tensor, writing the step's keys and values into
their slot, and the new `FeedbackState`. Sampling stays outside too, so that `generate(rng=...)` draws exactly as
without compiling.

The decoder is used by `generate()` when the transformer was built with `compile=` and the modules around it are
the standard ones (`nn.Embedding` without `max_norm`, a `nn.Linear` head, the model's affine `nn.LayerNorm`), and
not under `torch.autocast` (whose casts the step would have to follow by hand); otherwise `generate()` calls the
model token by token as before. Either way the logits are the same function: the tests compare them token by
token.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from labml_nn.transformers.feedback.compiled import CompiledStep
from labml_nn.transformers.feedback.fused_records import LayerWeights, LoopConfig, caster
from labml_nn.transformers.feedback.fused_steps import (
    MATRIX_PRODUCTS,
    FeedbackModel,
    Products,
    attention_query,
    feed_forward,
    loop_config,
    memory_entry,
    products_dtype,
    supports,
)
from labml_nn.transformers.feedback.stack import first_visible
from labml_nn.transformers.feedback.state import FeedbackState


def _row_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # $(ab)_{ij} = \sum_k a_{ik} b_{kj}$ as a sum over `[rows, k, columns]`
    return (a[:, :, None] * b[None]).sum(1)


def _row_addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return c + _row_mm(a, b)


# The products of a single row, written as sums for the compiler to fuse
ROW_SUMS = Products(_row_mm, _row_addmm)


def static_step(cfg: LoopConfig, x: torch.Tensor, work: torch.Tensor, bounds: torch.Tensor,
                layers: List[LayerWeights], mem_w: torch.Tensor, kv_w: torch.Tensor,
                kv_b: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""
    One step of the loop over fixed shapes (see above), without dropout and without autograd's records.

    * `cfg`: the loop's settings (sizes, `memory_norm`; dropout, `n_start` and the seed are not read)
    * `x`: the step's embedding $x_t^0$ `[B, D]`
    * `work`: the cache buffer `[G, 2, B, H, C, d_k]` ([layout](state.html#layout)); not written
    * `bounds`: `[lo, hi]`, int64: the step sees slots `lo .. hi - 1`
    * `layers`: the weights, with position terms for the $C$ distances $C \dots 1$
    * `mem_w`, `kv_w`, `kv_b`: $\mathrm{softmax}(w)$ and the key/value projection

    Returns the last layer's output $x_t^L$ `[B, D]` and the step's cache entry `[G, 2, B, H, d_k]`, for the caller
    to write into slot `hi`.
    """
    B, D = x.shape
    G, H, dk = cfg.groups, cfg.heads, cfg.d_k
    C = work.shape[4]
    to_low = caster(work.dtype, x.dtype)
    high = x.dtype
    # A single row: products as sums (see above); `B` is a constant of the compiled step
    products = ROW_SUMS if B == 1 else MATRIX_PRODUCTS
    scale = 1 / dk ** 0.5
    # The slots this step sees, `[C]`, and whether it sees any
    slots = torch.arange(C, device=x.device)
    lo, hi = bounds[0], bounds[1]
    valid = (slots >= lo) & (slots < hi)
    has_memory = (hi > lo).to(high)
    # The column of each slot's distance $\Delta_j = \mathrm{hi} - j$ in the table of distances $C \dots 1$
    # (clamped for masked slots, whose distance may be out of the table)
    column = (slots + C - hi).clamp(0, C - 1)
    # Each group's keys and values as `[B * H, C, d_k]`
    keys = [work[g, 0].reshape(B * H, C, dk) for g in range(G)]
    values = [work[g, 1].reshape(B * H, C, dk) for g in range(G)]
    xs = [x]
    for l, lw in enumerate(layers):
        g = l if G > 1 else 0
        _, _, q, qu = attention_query(x, lw, lw.w_q.t(), cfg, to_low, products)
        # $(q + u)^\top k_j$ for every slot: `[B, H, C]`
        content = torch.bmm(qu, keys[g].transpose(1, 2)).view(B, H, C)
        # $\frac{1}{\sqrt{d_k}}(q^\top p_\Delta + s_\Delta)$ for every distance, `[H, B, C]`, then gathered by slot
        # (one row: as a sum, like its other products)
        q_h, pos_k, pos_b = q.view(B, H, dk).transpose(0, 1), lw.pos_emb.permute(1, 2, 0), lw.pos_bias.t()[:, None, :]
        if products is ROW_SUMS:
            position = (pos_b + (q_h[:, :, :, None] * pos_k[:, None]).sum(2)) * scale
        else:
            position = torch.baddbmm(pos_b, q_h, pos_k, beta=scale, alpha=scale)
        position = position.index_select(2, column)
        # Scores of the visible slots; $-\infty$ elsewhere: `[B, H, C]`
        scores = torch.add(position.transpose(0, 1), content, alpha=scale).masked_fill(~valid, float('-inf'))
        # $P = \mathrm{softmax}_j$, and $0$ where no slot is visible (the first step)
        p = torch.softmax(scores, dim=-1, dtype=high).masked_fill(~valid, 0.0)
        # $o = \sum_j P_j v_j$, heads concatenated: `[B, D]`
        o = torch.bmm(to_low(p).view(B * H, 1, C), values[g]).view(B, D)
        # $x_1 = x + [\mathrm{hi} > \mathrm{lo}]\,(W_o o + b_o)$
        x1 = x + has_memory * products.addmm(lw.b_o, o, lw.w_o.t())
        # The feed-forward block, as in the loop
        x, _ = feed_forward(x1, lw, lw.w_1.t(), lw.w_2.t(), cfg, to_low, products=products)
        xs.append(x)
    # $m_t$'s keys and values for every group
    _, _, kv = memory_entry(cfg, xs, mem_w, kv_w.t(), kv_b, to_low, products)
    return x, kv


def slot_bounds(t: int, memory_span: Optional[int], first: int, device: torch.device) -> torch.Tensor:
    """
    `[lo, hi]` (int64, on `device`): step $t$ sees the buffer's slots `lo .. hi - 1` and writes its own entry into
    slot `hi`, in a buffer whose slot 0 holds absolute step `first`.
    """
    return torch.tensor([first_visible(t, memory_span) - first, t - first], device=device)


def run_compiled_steps(compiled: CompiledStep, cfg: LoopConfig, x_seq: torch.Tensor, layers: List[LayerWeights],
                       mem_w: torch.Tensor, kv_w: torch.Tensor, kv_b: Optional[torch.Tensor], work: torch.Tensor,
                       first: int) -> torch.Tensor:
    r"""
    `run_steps` ([fused_steps.py](fused_steps.html)) without dropout or records, one compiled fixed-shape step per
    position: reads the cache from and writes the new entries into `work` (slot 0 holding absolute step `first`,
    `layers` with position terms for all of its slots). Returns the last layer's outputs $x_t^L$ `[T, B, D]`.
    """
    T = x_seq.shape[0]
    n_new = T if cfg.make_last_memory else T - 1
    step = compiled(static_step, x_seq.device)
    # Sizes and settings only: what changes from call to call (the first step, the seed) is not among the
    # compiled step's constants, so that it does not recompile for it
    constants = cfg._replace(n_start=0, make_last_memory=True, seed=0)
    outputs = []
    # The products' dtype is followed by hand, as in the loop
    with torch.autocast(x_seq.device.type, enabled=False):
        for i in range(T):
            t = cfg.n_start + i
            bounds = slot_bounds(t, cfg.memory_span, first, x_seq.device)
            x, kv = step(constants, x_seq[i], work, bounds, layers, mem_w, kv_w, kv_b)
            # A copy: CUDA graphs reuse their outputs' memory at the next replay
            outputs.append(x.clone())
            if i < n_new:
                # The step's entry into its slot, `hi`
                work[..., t - first, :] = kv
    return torch.stack(outputs)


# ## Decoding


def token_step(cfg: LoopConfig, token: torch.Tensor, work: torch.Tensor, bounds: torch.Tensor,
               embedding: torch.Tensor, layers: Tuple[LayerWeights, ...], mem_w: torch.Tensor, kv_w: torch.Tensor,
               kv_b: Optional[torch.Tensor], norm: Tuple[torch.Tensor, torch.Tensor, float],
               head: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""
    One generated token's work over fixed shapes (the function that is compiled):

    * `token`: the token ids of step $t$, `[B]`
    * `work`, `bounds`, `layers`, `mem_w`, `kv_w`, `kv_b`: as in `static_step` (the cache buffer `[G, 2, B, H, C,
      d_k]`, the visible slots `[lo, hi]`, the weights with position terms for $C$ distances)
    * `embedding`: the token embeddings `[n_vocab, D]`
    * `norm`: the final norm's gain, bias and $\epsilon$; `head`: the head's weight `[n_vocab, D]` and bias

    Returns the logits `[B, n_vocab]` and the step's cache entry `[G, 2, B, H, d_k]` for slot `hi`.
    """
    # $x_t^0$ `[B, D]`
    x = F.embedding(token, embedding)
    # The step: $x_t^L$ and the keys and values of $m_t$
    x, kv = static_step(cfg, x, work, bounds, list(layers), mem_w, kv_w, kv_b)
    # $\mathrm{LN}(x_t^L)$, then the logits $W y + b$ (one row: as a sum, like the step's products)
    gain, bias, eps = norm
    y = F.layer_norm(x, (x.shape[1],), gain, bias, eps)
    products = ROW_SUMS if x.shape[0] == 1 else MATRIX_PRODUCTS
    return products.addmm(head[1], y, head[0].t()), kv


def token_decoder(model: FeedbackModel, embedding: nn.Module, head: nn.Module,
                  like: torch.Tensor) -> Optional["TokenDecoder"]:
    """
    A `TokenDecoder` for a Feedback Transformer `model` (built with `compile=`) between `embedding` and `head`, or
    `None` where it does not apply (see above): then the caller runs the modules. `like`: a tensor on the device
    generation runs on.
    """
    if (model.compiled_step is None or not model.fused or not all(supports(layer) for layer in model.layers)
            or type(embedding) is not nn.Embedding or embedding.max_norm is not None
            or type(head) is not nn.Linear or head.bias is None
            or type(model.norm) is not nn.LayerNorm or not model.norm.elementwise_affine or model.norm.bias is None
            or products_dtype(embedding.weight, model.weights.dtype) is not None
            or embedding.weight.dtype != model.weights.dtype):
        return None
    return TokenDecoder(model, embedding, head, like.device)


class TokenDecoder:
    r"""
    `logits, state = decoder(token, state)`: the model's logits for one token per sequence after `state`, and the
    state after it; what `model(token[None], state=state, return_state=True)` computes (its last position), in one
    compiled call. Without autograd (generation runs under `torch.inference_mode()`).
    """

    def __init__(self, model: FeedbackModel, embedding: nn.Embedding, head: nn.Linear, device: torch.device):
        self.model, self.embedding, self.head = model, embedding, head
        self.step = model.compiled_step(token_step, device)
        # Sizes and settings only (no dropout; the first step and the seed are not read): the same constants at
        # every token, so that the compiled function is not rebuilt for them
        self.cfg = loop_config(model, 0, True, dropout=False, dtype=None)
        self.dtype = model.weights.dtype
        # The weights for a cache buffer of each capacity met so far: a decoder lives for one `generate()` call,
        # during which the parameters do not change, so they are checked once per capacity, not once per token
        self.weights: Dict[int, tuple] = {}

    def __call__(self, token: torch.Tensor, state: FeedbackState) -> Tuple[torch.Tensor, FeedbackState]:
        """`token` `[B]` after `state` (a `FeedbackState` of batch `B`): logits `[B, n_vocab]` and the new state."""
        model: FeedbackModel = self.model
        t = state.n_steps
        # Room for step $t$'s entry in a buffer that also holds every entry it sees; slot 0 is absolute step `first`
        stack = state.stack_for_continuation()
        # An entry's shape and dtype, `[G, 2, B, H, d_k]` (its values are not read)
        visible = state.visible
        cache, first = stack.reserve(1, visible.new_empty(visible.shape[:4] + visible.shape[5:]))
        # The weights with position terms for every slot of the buffer
        capacity = cache.shape[4]
        if capacity not in self.weights:
            layers, mem_w, kv_w, kv_b = model.inference_cache.weights(model, capacity, self.dtype)
            self.weights[capacity] = (tuple(layers), mem_w, kv_w, kv_b)
        layers, mem_w, kv_w, kv_b = self.weights[capacity]
        # Step $t$ sees slots `lo .. hi - 1`; its own entry goes to slot `hi`
        bounds = slot_bounds(t, model.memory_span, first, cache.device)
        hi = t - first
        norm = (model.norm.weight, model.norm.bias, model.norm.eps)
        logits, kv = self.step(self.cfg, token, cache, bounds, self.embedding.weight, layers, mem_w, kv_w, kv_b, norm,
                               (self.head.weight, self.head.bias))
        cache[..., hi, :] = kv
        # A copy of the logits: CUDA graphs reuse their outputs' memory at the next replay
        return logits.clone(), FeedbackState(stack, t + 1, stack.extended(1))
