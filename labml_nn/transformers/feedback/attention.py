r"""
---
title: Feedback attention with relative positions
summary: Multi-head attention of one step's query over the memory of all earlier steps, with Transformer-XL
  style relative position terms clipped to a small table.
---

# Feedback attention

At step $t$ a layer has a single query, made from its input $x_t^{l-1}$, and attends over the memory vectors
of the earlier steps $m_0 \dots m_{t-1}$ (never over step $t$ itself, whose memory is not yet made).
With $q = W_q \,\mathrm{LN}(x_t^{l-1})$ split into $h$ heads, keys $k_j = W_k m_j$ and values
$v_j = W_v m_j$, the score of memory slot $j$ at distance $\Delta = t - j \ge 1$ is

$$A_{tj} = \frac{1}{\sqrt{d_k}} \Big( \underbrace{(q + u)^\top k_j}_{\text{content}}
  + \underbrace{q^\top p_{\Delta}}_{\text{position}} + \underbrace{s_{\Delta}}_{\text{position bias}} \Big)$$

per head, as in Transformer-XL: $u$ is a learned query bias shared by all positions, $p_\Delta$ a learned
key embedding of the distance and $s_\Delta$ a learned scalar per head and distance. The output is

$$\mathrm{Attn}_t = W_o \big[\, \textstyle\sum_j \mathrm{softmax}_j(A_{tj})\, v_j \,\big]_{\text{heads}} + b_o .$$

## The position table

The table holds $P$ = `max_distance` entries for $\Delta = 1 \dots P$. Longer distances use the last entry:
$p_\Delta = p_P$ and $s_\Delta = s_P$ for $\Delta > P$, so any sequence length works. The default $P = 128$
covers the training context of the experiments; labml_nn keeps 4096 entries, which at $d_{model} = 128$ is
most of the model's parameters.

Because the memory visible at a step is always the *latest* $n$ memory vectors, its distances are
$n, n-1, \dots, 1$: the position terms depend only on how many vectors are visible, not on $t$.
`relative_terms(n)` builds them once per forward pass; each step takes the last rows it needs.

This is the same parametrization as labml_nn's [multi-head attention](../mha.html) with
[Transformer-XL](https://arxiv.org/abs/1901.02860)'s relative positions, cut down to one query per step.

## Starting with a preference for recent memory

The position table starts at zero (labml_nn's initialization): at first every head attends evenly to all the
memory it sees. With `recency_init=True` the position bias starts with [ALiBi's slopes](../recency.html): head $h$
of $H$ prefers recent slots with its own slope $m_h = 2^{-8h/H}$,

$$s_\Delta = -\sqrt{d_k}\; m_h\, (\Delta - 1),$$

(the nearest memory vector, $\Delta = 1$, has no penalty), and learns from there. This matters when a step sees
a wide memory that carries no gradient: memory carried across training batches. With
even attention over 64 carried memory vectors a small model settles into using their average and stops improving
(the [accelerators log](https://github.com/labml-feedback/labml_nn/blob/main/experiments/accelerators_log.md)
measures it); a recency preference at the start lets it find the recent tokens first.

## Biases

The key and value projections have no bias: a key bias adds the same $q^\top b$ to every score
(softmax ignores it) and a value bias adds a constant that the output bias $b_o$ already provides.
"""

import math
from typing import Optional, Tuple

import torch
from torch import nn

from labml_nn.transformers.mha import PrepareForMultiHeadAttention
from labml_nn.transformers.recency import recency_bias


class FeedbackAttention(nn.Module):
    r"""
    Attention of one step's query over earlier memory.

    * `heads`: number of heads $h$; `d_model` must be divisible by it.
    * `is_kv_precomputed`: no `key` / `value` layers of its own (`FeedbackTransformerKV` shares one projection
      between all layers). Either way the keys and values arrive projected: the transformer projects each memory
      vector once, with this layer's $W_k, W_v$ or the shared ones, and caches the result.
    * `max_distance`: size $P$ of the relative position table; longer distances are clipped to $P$.
    * `recency_init`: start the position bias $s_\Delta$ with ALiBi's recency slopes instead of zeros.
    """

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.1, *,
                 is_kv_precomputed: bool = False, max_distance: int = 128, recency_init: bool = False):
        super().__init__()
        if not isinstance(heads, int) or heads < 1 or not isinstance(d_model, int) or d_model % heads != 0:
            raise ValueError(f"d_model ({d_model!r}) must be a positive multiple of heads ({heads!r})")
        if not isinstance(max_distance, int) or max_distance < 1:
            raise ValueError(f"max_distance must be an int >= 1, got {max_distance!r}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob!r}")
        self.heads = heads
        self.d_model = d_model
        self.d_k = d_model // heads
        self.max_distance = max_distance
        self.is_kv_precomputed = is_kv_precomputed
        # $W_q$
        self.query = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=False)
        if not is_kv_precomputed:
            # $W_k$ and $W_v$ of this layer (`FeedbackTransformer` applies them to each memory vector once)
            self.key = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=False)
            self.value = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=False)
        # $W_o, b_o$
        self.output = nn.Linear(d_model, d_model)
        # Dropout on the attention probabilities
        self.dropout = nn.Dropout(dropout_prob)
        # $\frac{1}{\sqrt{d_k}}$
        self.scale = 1 / math.sqrt(self.d_k)
        # $u$, `[heads, d_k]`
        self.query_pos_bias = nn.Parameter(torch.zeros(heads, self.d_k))
        # $p_\Delta$ for $\Delta = 1 \dots P$, `[P, heads, d_k]`
        self.key_pos_embeddings = nn.Parameter(torch.zeros(max_distance, heads, self.d_k))
        # $s_\Delta$ for $\Delta = 1 \dots P$, `[P, heads]`
        self.key_pos_bias = nn.Parameter(torch.zeros(max_distance, heads))
        if recency_init:
            with torch.no_grad():
                self.key_pos_bias.copy_(recency_bias(max_distance, heads, self.d_k))

    def relative_terms(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""
        Position embeddings `[n, heads, d_k]` and biases `[n, heads]` for memory slots at distances
        $n, n-1, \dots, 1$ (oldest first, like the memory), clipped to the table: row $\min(\Delta, P) - 1$.
        """
        distance = torch.arange(n, 0, -1, device=self.key_pos_bias.device)
        rows = distance.clamp_(max=self.max_distance) - 1
        return self.key_pos_embeddings[rows], self.key_pos_bias[rows]

    def forward(self, *, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                pos_emb: Optional[torch.Tensor] = None,
                pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""
        * `query`: the normalised input of this step, `[batch_size, d_model]`.
        * `key`, `value`: the keys and values of the visible memory, oldest first, `[n, batch_size, heads, d_k]`
          (the transformers project each memory vector once and cache its keys and values)
        * `pos_emb`, `pos_bias`: `relative_terms(N)` for some `N >= n`; this step uses their last `n` rows.
          Computed here when omitted.

        Returns `[batch_size, d_model]`.
        """
        # The number of visible memory slots
        n = key.shape[0]
        if pos_emb is None or pos_bias is None:
            pos_emb, pos_bias = self.relative_terms(n)
        # The last `n` rows: distances $n \dots 1$, oldest slot first, as the memory is ordered
        pos_emb, pos_bias = pos_emb[-n:], pos_bias[-n:]
        batch_size = query.shape[0]
        # $q$, `[batch_size, heads, d_k]`
        q = self.query(query)
        # Keys and values as `[batch_size, heads, n, d_k]` views (no copy when the cache keeps time on the
        # second-to-last axis, as the transformers' caches do)
        key, value = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
        # $(q + u)^\top k_j$, `[batch_size, heads, 1, n]`
        scores = torch.matmul((q + self.query_pos_bias).unsqueeze(-2), key.transpose(-1, -2))
        # $+\, q^\top p_\Delta$: per head, `[heads, batch_size, d_k] @ [heads, d_k, n]`
        position = torch.matmul(q.transpose(0, 1), pos_emb.permute(1, 2, 0))
        scores = scores.squeeze(-2) + position.transpose(0, 1)
        # $+\, s_\Delta$, then $\frac{1}{\sqrt{d_k}}$ and the softmax over the memory slots $j$
        attn = torch.softmax((scores + pos_bias.t()) * self.scale, dim=-1)
        attn = self.dropout(attn)
        # $\sum_j \mathrm{softmax}_j(A_{tj}) v_j$, `[batch_size, heads, d_k]`
        out = torch.matmul(attn.unsqueeze(-2), value).squeeze(-2)
        # Concatenate the heads and apply $W_o, b_o$
        return self.output(out.reshape(batch_size, self.d_model))

