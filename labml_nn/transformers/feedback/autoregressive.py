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

## Cached generation

Sampling text the naive way runs the model over the whole sequence again for every new token: token $T$
costs $T$ steps, and $T$ tokens cost $O(T^2)$ steps (for the Feedback Transformer every one of them
sequential). The state API removes the repetition. `generate()` feeds the prompt once,

$$\text{logits}, s = \text{model}(\text{prompt}, \text{state}=\varnothing),$$

then repeatedly picks a token $y$ from the last logits and feeds only that token,
$\text{logits}, s \leftarrow \text{model}(y, \text{state}=s)$. Each new token is one step of the model;
the only work that grows with the length is the attention over the cached memory (a dot product per
memory slot), and with a `memory_span` not even that.

The next token is drawn from the softmax of the logits $z$ at temperature $\tau$,

$$p_i \propto \exp\big((z_i - \max_j z_j) / \tau\big),$$

restricted to the `top_k` largest logits when given. $\tau = 0$ is the limit $\tau \to 0$: the most likely
token (greedy decoding). Subtracting $\max_j z_j$ changes nothing mathematically and keeps tiny
temperatures from overflowing.

Only `model(tokens, state=state, return_state=True)` is used, so any transformer with the state API can be
sampled this way: both Feedback Transformers (their state is the cached keys and values of the memory) and a
parallel transformer whose state is a key/value cache.
"""

import math
from typing import Dict, Optional, Tuple, Union

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
            raise ValueError(f"{name} holds token ids in [{lo}, {hi}], "
                             f"outside the vocabulary [0, {self.n_vocab - 1}]")

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, rng: Optional[torch.Generator] = None) -> torch.Tensor:
        r"""
        Continue `prompt` by `max_new_tokens` tokens, each sampled from the model given all tokens before it.

        * `prompt`: token ids, `LongTensor [prompt_len >= 1, batch_size]`; each column is continued on its own
        * `max_new_tokens`: how many tokens to add, `>= 0`
        * `temperature`: $\tau \ge 0$; `0` is greedy decoding (the most likely token, `top_k` then has no effect)
        * `top_k`: sample only among the `top_k` most likely tokens (`None`: all; values above the vocabulary
          size mean all)
        * `rng`: the `torch.Generator` that `torch.multinomial` draws from, on the model's device, for
          reproducible samples independent of the global random state; `None` uses the global generator
          (so `torch.manual_seed` makes it reproducible too)

        Returns `LongTensor [prompt_len + max_new_tokens, batch_size]`: the prompt followed by the new tokens.

        The prompt runs through the model once; each new token is then one call on the cached state. The
        model runs in eval mode (no dropout) without autograd; the train/eval mode of every submodule is
        restored afterwards. Nothing is kept between calls.
        """
        self.check_tokens(prompt, "prompt")
        check_sampling_args(max_new_tokens, temperature, top_k, rng, self.src_embed.weight.device)
        if prompt.device != self.src_embed.weight.device:
            raise ValueError(f"prompt is on {prompt.device} but the model is on "
                             f"{self.src_embed.weight.device}")
        prompt_len, batch_size = prompt.shape
        # Eval mode for every submodule, remembering each one's own flag
        modes: Dict[nn.Module, bool] = {m: m.training for m in self.modules()}
        self.eval()
        try:
            # `inference_mode` is `no_grad` without autograd's bookkeeping (version counters, view tracking)
            with torch.inference_mode():
                # The prompt, then room for the new tokens, `[prompt_len + max_new_tokens, batch_size]`
                tokens = torch.empty((prompt_len + max_new_tokens, batch_size), dtype=torch.long,
                                     device=prompt.device)
                tokens[:prompt_len] = prompt
                if max_new_tokens > 0:
                    # The whole prompt in one call: logits for the first new token and the state after the prompt
                    logits, state = self(tokens[:prompt_len], return_state=True)
                    # A compiled Feedback Transformer makes each new token one compiled call
                    # ([static_step.py](static_step.html#decoding)); other transformers run the modules
                    decoder = getattr(self.transformer, 'token_decoder', None)
                    decoder = None if decoder is None else decoder(self.src_embed, self.generator, tokens)
                    last = logits[-1]
                    for t in range(prompt_len, prompt_len + max_new_tokens):
                        tokens[t] = sample_token(last, temperature, top_k, rng)
                        if t + 1 < tokens.shape[0]:
                            # One step from the cached state: only the new token goes in
                            if decoder is not None:
                                last, state = decoder(tokens[t], state)
                            else:
                                logits, state = self(tokens[t:t + 1], state=state, return_state=True)
                                last = logits[-1]
        finally:
            for m, training in modes.items():
                m.training = training
        # A normal tensor (not an inference tensor), free to use with autograd or modify in place
        return tokens.clone()


def sample_token(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                 rng: Optional[torch.Generator] = None) -> torch.Tensor:
    r"""
    Pick one token per row of `logits` `[batch_size, n_vocab]`: the most likely when `temperature` is 0,
    otherwise a draw from $\mathrm{softmax}(z / \tau)$ over the `top_k` largest logits (all when `None`).
    Returns `LongTensor [batch_size]`.

    Any $\tau > 0$ works, however small. A Python float such as $10^{-46}$ is below the smallest positive float32
    and would become 0 in a float32 division ($0 / 0$ at the maximum); below the logits' smallest normal number
    the division runs in float64, which holds every positive Python float, and the maximum itself is set to 0
    rather than divided, so a $\tau$ that still rounds to 0 gives the limit: a uniform draw among the tied maxima.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    ids = None
    if top_k is not None and top_k < logits.shape[-1]:
        # The `top_k` largest logits, in decreasing order, and their token ids, `[batch_size, top_k]`
        logits, ids = torch.topk(logits, top_k, dim=-1)
    if logits.dtype != torch.float64 and temperature < torch.finfo(logits.dtype).tiny:
        logits = logits.double()
    # $z_i - \max_j z_j \le 0$
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    # Divided by $\tau$: no overflow however small $\tau$ is ($-\infty$ at worst), and exactly 0 at the maximum
    # ($\tau = 1$ changes nothing: skipped, as it is the default and costs three operations per token)
    logits = shifted if temperature == 1 else torch.where(shifted == 0, torch.zeros_like(shifted),
                                                          shifted / temperature)
    # One draw per row from $p \propto \exp(\cdot)$, `[batch_size, 1]`
    choice = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng)
    if ids is not None:
        choice = ids.gather(-1, choice)
    return choice.squeeze(-1)


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: Optional[int],
                        rng: Optional[torch.Generator] = None, device: Optional[torch.device] = None, *,
                        tokens_name: str = 'max_new_tokens') -> None:
    """
    The one check of the sampling arguments (`generate()` and the sampling command, which calls the number of new
    tokens `tokens_name`): a `ValueError` or `TypeError` naming the first bad one.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"{tokens_name} must be an int >= 0, got {max_new_tokens!r}")
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None (no limit) or an int >= 1, got {top_k!r}")
    if rng is not None and not isinstance(rng, torch.Generator):
        raise TypeError(f"rng must be a torch.Generator or None, got {type(rng).__name__}")
    if rng is not None and device is not None and rng.device.type != device.type:
        raise ValueError(f"rng is on {rng.device} but the model is on {device}; "
                         f"make it with torch.Generator(device={str(device)!r})")

