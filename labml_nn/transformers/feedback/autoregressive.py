r"""
---
title: Autoregressive language model around a transformer
summary: Token embedding, a transformer (feedback or parallel) and a linear head to next-token logits.
---

# Autoregressive model

A character-level language model predicts token $t+1$ from tokens $0 \dots t$:

$$\text{tokens} \xrightarrow{\ \text{embedding}\ } x^0 \xrightarrow{\ \text{transformer}\ }
  \mathrm{LN}(x^L) \xrightarrow{\ \text{linear}\ } \text{logits}.$$

The transformer applies its own final layer norm. Any transformer with the state API works here:
`transformer(x, state=..., return_state=...)`, so a sequence can be fed in pieces, which is what cached
generation does.
"""

from typing import Optional, Tuple, Union

import torch
from torch import nn


class AutoregressiveModel(nn.Module):
    """
    * `n_vocab`: vocabulary size
    * `d_model`: embedding size, the transformer's width
    * `transformer`: maps `[seq_len, batch_size, d_model]` to the same shape and takes `state=` / `return_state=`
    """

    def __init__(self, n_vocab: int, d_model: int, transformer: nn.Module):
        super().__init__()
        if not isinstance(n_vocab, int) or n_vocab < 1:
            raise ValueError(f"n_vocab must be a positive int, got {n_vocab!r}")
        self.n_vocab = n_vocab
        # Token embeddings, $x^0$
        self.src_embed = nn.Embedding(n_vocab, d_model)
        self.transformer = transformer
        # Logits from the normalised output of the transformer
        self.generator = nn.Linear(d_model, n_vocab)

    def forward(self, x: torch.Tensor, state: Optional[object] = None,
                return_state: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, object]]:
        """
        * `x`: token ids, `LongTensor [seq_len, batch_size]`
        * `state`, `return_state`: passed to the transformer, to continue a sequence

        Returns logits `[seq_len, batch_size, n_vocab]` (and the transformer's state if asked for).
        """
        self.check_tokens(x, "x")
        # $x^0$, `[seq_len, batch_size, d_model]`
        emb = self.src_embed(x)
        if return_state:
            out, state = self.transformer(emb, state=state, return_state=True)
            return self.generator(out), state
        return self.generator(self.transformer(emb, state=state))

    def check_tokens(self, x: torch.Tensor, name: str) -> None:
        """Raise a clear error unless `x` is a non-empty `[seq_len, batch_size]` tensor of ids in the vocabulary."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a LongTensor [seq_len, batch_size], got {type(x).__name__}")
        if x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {x.dtype}")
        if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must have shape [seq_len >= 1, batch_size >= 1], got {list(x.shape)}")
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= self.n_vocab:
            raise ValueError(f"{name} holds token ids in [{lo}, {hi}], outside the vocabulary [0, {self.n_vocab - 1}]")
