r"""
---
title: Preparing queries, keys and values for multi-head attention
summary: A linear projection followed by a split of the features into attention heads.
---

# Preparing for multi-head attention

Multi-head attention runs $h$ attention functions side by side, each over its own $d_k$-dimensional
slice of the queries, keys and values. Every one of them starts the same way: a linear map of the
$d_{model}$-dimensional input,

$$q = W x + b, \qquad W \in \mathbb{R}^{h d_k \times d_{model}},$$

whose output is then read as $h$ vectors of size $d_k$. This module does exactly that, for inputs of any
leading shape: `[seq_len, batch_size, d_model]`, `[batch_size, d_model]` (one step of a recurrent model),
and so on.
"""

import torch
from torch import nn


class PrepareForMultiHeadAttention(nn.Module):
    """
    A linear layer from `d_model` to `heads * d_k` features, reshaped to `[..., heads, d_k]`.
    """

    def __init__(self, d_model: int, heads: int, d_k: int, bias: bool):
        super().__init__()
        for name, value in (("d_model", d_model), ("heads", heads), ("d_k", d_k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # $W$ and (optionally) $b$ for all heads at once
        self.linear = nn.Linear(d_model, heads * d_k, bias=bias)
        self.heads = heads
        self.d_k = d_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `x` has shape `[..., d_model]`
        head_shape = x.shape[:-1]
        # $W x + b$ has shape `[..., heads * d_k]`
        x = self.linear(x)
        # Read the features as `[..., heads, d_k]`
        return x.view(*head_shape, self.heads, self.d_k)
