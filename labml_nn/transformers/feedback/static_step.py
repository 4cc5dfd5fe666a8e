r"""
---
title: One step over fixed shapes
summary: A Feedback Transformer step whose tensors have the same shapes at every step - attention over the whole
  preallocated cache with the slots a step may not see masked out - so that torch.compile builds it once and a
  GPU can replay it as a CUDA graph.
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
"""

from typing import List, Optional, Tuple

import torch

from labml_nn.transformers.feedback.compiled import CompiledStep
from labml_nn.transformers.feedback.fused_records import LayerWeights, LoopConfig, caster
from labml_nn.transformers.feedback.fused_steps import (
    MATRIX_PRODUCTS,
    Products,
    attention_query,
    feed_forward,
    memory_entry,
)
from labml_nn.transformers.feedback.stack import first_visible


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
            # The slots step $t$ sees, `lo .. hi - 1`, in the buffer whose slot 0 is absolute step `first`
            bounds = torch.tensor([first_visible(t, cfg.memory_span) - first, t - first], device=x_seq.device)
            x, kv = step(constants, x_seq[i], work, bounds, layers, mem_w, kv_w, kv_b)
            # A copy: CUDA graphs reuse their outputs' memory at the next replay
            outputs.append(x.clone())
            if i < n_new:
                # The step's entry into its slot, `hi`
                work[..., t - first, :] = kv
    return torch.stack(outputs)
