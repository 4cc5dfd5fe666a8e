r"""
---
title: Position-wise feed-forward network
summary: The two-layer MLP applied to every position of a transformer, with an optional gate (GLU variants).
---

# Position-wise feed-forward network

After attention has mixed information *between* positions, each position is transformed on its own by a
small two-layer network,

$$\mathrm{FFN}(x) = f(x W_1 + b_1) W_2 + b_2,$$

where $f$ is the activation (ReLU by default) and the hidden layer is usually wider than the model,
$d_{ff} \approx 4 d_{model}$.

## Gated variants

Shazeer's *GLU Variants Improve Transformer* multiplies the activation by a second, linear projection,

$$\mathrm{FFN}_{\text{gated}}(x) = \big(f(x W_1 + b_1) \otimes (x V + c)\big) W_2 + b_2,$$

which gives ReGLU with $f = \mathrm{ReLU}$, GEGLU with GELU and SwiGLU with Swish. Set `is_gated=True`.
"""

import torch
from torch import nn


class FeedForward(nn.Module):
    """
    The feed-forward block: `d_model -> d_ff -> d_model`, dropout on the hidden layer.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1, activation: nn.Module = None,
                 is_gated: bool = False, bias1: bool = True, bias2: bool = True, bias_gate: bool = True):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(d_ff, int) or d_ff < 1:
            raise ValueError(f"d_ff must be a positive int, got {d_ff!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        # $W_1, b_1$
        self.layer1 = nn.Linear(d_model, d_ff, bias=bias1)
        # $W_2, b_2$
        self.layer2 = nn.Linear(d_ff, d_model, bias=bias2)
        # Dropout on the hidden layer
        self.dropout = nn.Dropout(dropout)
        # The activation $f$; a fresh ReLU unless one is given
        self.activation = activation if activation is not None else nn.ReLU()
        self.is_gated = is_gated
        if is_gated:
            # $V, c$ of the gate
            self.linear_v = nn.Linear(d_model, d_ff, bias=bias_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # $f(x W_1 + b_1)$
        hidden = self.activation(self.layer1(x))
        if self.is_gated:
            # $f(x W_1 + b_1) \otimes (x V + c)$
            hidden = hidden * self.linear_v(x)
        # $\big(\dots\big) W_2 + b_2$, with dropout on the hidden units
        return self.layer2(self.dropout(hidden))
