r"""
---
title: A preference for recent positions at initialization
summary: ALiBi's per-head slopes as the starting value of a learned relative position bias, shared by the Feedback
  Transformer's attention and the parallel baseline's.
---

# Recency at initialization

Both models here score a key at distance $\Delta$ with a learned scalar bias $s_\Delta$ per head (besides the
content and position terms). Started at zero, every head attends evenly to everything it sees. When that is a wide
window (memory carried across training batches, or a parallel transformer that sees a whole program) the average
carries almost no gradient towards any single position, and a small model settles into using it.

ALiBi ([Press et al., 2021](https://arxiv.org/abs/2108.12409)) adds a fixed linear penalty with a different slope
per head. Here the slopes are only the **starting point** of the learned bias: head $h$ of $H$ starts with

$$s_\Delta = -\sqrt{d_k}\; m_h\, \Delta', \qquad m_h = 2^{-8h/H},$$

where $\Delta'$ counts from the nearest position the model can attend to (the $\sqrt{d_k}$ because the scores are
divided by it after $s_\Delta$ is added). Steep heads start local, shallow heads nearly even, and training moves
them from there.
"""

import math

import torch


def recency_bias(rows: int, heads: int, d_k: int) -> torch.Tensor:
    r"""
    ALiBi's recency bias, `[rows, heads]`: row $r$, head $h$ holds $-\sqrt{d_k}\, m_h\, r$ with $m_h = 2^{-8h/H}$,
    $h = 1 \dots H$ (row 0 is the nearest position a query attends to).
    """
    # $m_h$, `[heads]`: a geometric sequence from $2^{-8/H}$ down to $2^{-8}$
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
    # The distance of each row from the nearest one, `[rows, 1]`
    offsets = torch.arange(rows, dtype=torch.float32)[:, None]
    return -math.sqrt(d_k) * offsets * slopes[None, :]
