r"""
---
title: The pre-norm residual layer
summary: What every transformer layer of this library shares - attention and a feed-forward network, each behind
  its own layer norm in a residual branch with dropout, under labml_nn's parameter names.
---

# The pre-norm residual layer

The Feedback Transformer's layers and the parallel baseline's are both *pre-norm*: each sublayer reads a
normalized copy of the residual stream and adds its output back, through dropout,

$$x \leftarrow x + \mathrm{Drop}\big(\mathrm{Attn}(\mathrm{LN}_{attn}(x))\big), \qquad
  x \leftarrow x + \mathrm{Drop}\big(\mathrm{FFN}(\mathrm{LN}_{ff}(x))\big).$$

`PreNormLayer` holds those parts under labml_nn's names (`attn`, `feed_forward`, `dropout`, `norm_self_attn`,
`norm_ff`), so that both models' checkpoints line up and
[`init_from`](feedback/init_from.html) can copy a parallel transformer's layers into a feedback model by name.
It owns the feed-forward half; each model writes its own attention half, since what attention reads differs: the
memory of earlier steps ([feedback](feedback/transformer.html)) or the earlier positions of the same layer
([causal](causal.html)).
"""

import torch
from torch import nn


class PreNormLayer(nn.Module):
    """
    * `d_model`: the width of the residual stream (kept as `size`, labml_nn's name)
    * `attn`: the attention module; `feed_forward`: the position-wise network
    * `dropout_prob`: dropout on both sublayers' outputs
    """

    def __init__(self, *, d_model: int, attn: nn.Module, feed_forward: nn.Module, dropout_prob: float):
        super().__init__()
        self.size = d_model
        self.attn = attn
        self.feed_forward = feed_forward
        self.dropout = nn.Dropout(dropout_prob)
        # $\mathrm{LN}_{attn}$ and $\mathrm{LN}_{ff}$
        self.norm_self_attn = nn.LayerNorm([d_model])
        self.norm_ff = nn.LayerNorm([d_model])

    def feed_forward_block(self, x: torch.Tensor) -> torch.Tensor:
        r"""$x + \mathrm{Drop}(\mathrm{FFN}(\mathrm{LN}_{ff}(x)))$, for `x` of any shape `[..., d_model]`."""
        return x + self.dropout(self.feed_forward(self.norm_ff(x)))
