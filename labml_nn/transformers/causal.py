r"""
---
title: A causal (parallel) transformer baseline with relative positions and a key/value cache
summary: An ordinary decoder-only transformer built from the same blocks as the Feedback Transformer, for comparison.
---

# Causal transformer baseline

To judge the Feedback Transformer we need the model it tries to improve on: an ordinary causal transformer of
the same size, where step $t$ of layer $l$ attends over the layer-$(l-1)$ outputs of steps $0 \dots t$.
Because no step depends on a *later-computed* representation of an earlier step, all positions of a sequence
are computed at once; that is what makes it fast to train, and what the feedback model gives up.

This module is built from the same pieces as the feedback model, with the same parameter names, so that a
trained baseline's weights can be copied into a feedback model by name:

* queries, keys and values from `PrepareForMultiHeadAttention` (`query`, `key`, `value`), an output
  projection `output`;
* the position-wise `FeedForward`;
* pre-norm residual blocks and a final `LayerNorm`;
* Transformer-XL style relative positions. For a query at position $i$ and a key at position $j \le i$
  (distance $\Delta = i - j \ge 0$)

$$A_{ij} = \frac{(q_i + u)^\top k_j + q_i^\top p_{\Delta} + s_{\Delta}}{\sqrt{d_k}},$$

  with a learned query bias $u$, key-position embeddings $p_\Delta$ and a scalar bias $s_\Delta$ per head.
  Distances beyond the table are clipped to its last entry.

## The state: a key/value cache

`out, state = model(x, state=state, return_state=True)` continues a sequence. Keys and values of a token never
change once computed, so the state keeps, for every layer, the keys and values of all earlier tokens, and the
number of tokens seen (the position offset). Running $T$ tokens in one call equals any chunking of them;
generating one token at a time costs one new row of keys/values per layer instead of re-running the prefix.

## A local window: `memory_span`

With `memory_span` $= S$ a query at position $t$ attends to the keys of positions $t - S \dots t$ only: itself and
the $S$ positions before it (distances $\Delta = 0 \dots S$). The past positions it sees are exactly those whose
memory vectors a Feedback Transformer with the same `memory_span` attends to at step $t$ ($m_{t-S} \dots m_{t-1}$);
the causal query also sees its own position, as any causal transformer does. What each model can know of the
past differs:

* a Feedback Transformer's memory vector $m_{t-1}$ was itself computed from $m_{t-1-S} \dots m_{t-2}$, and so on
  back: through the recurrence, step $t$ can depend on **every** earlier token;
* in the causal transformer layer $l$ at $t$ reads layer $l - 1$ at $t - S \dots t$, so $L$ layers see the tokens
  $t - LS \dots t$ and nothing older, however the sequence is chunked.

No later query needs a key older than the last $S$ positions, so the cache keeps only those: the state stays
bounded (at most $S$ keys and values per layer) however long a sequence is fed through it, which is what memory
carried across training segments (Transformer-XL style, the state detached between segments) needs.
`memory_span=None` is the unlimited causal transformer.

## Recency at initialization

`recency_init=True` starts the position bias $s_\Delta$ with [ALiBi's slopes](recency.html), as the Feedback
Transformer's attention does: head $h$ starts with $s_\Delta = -\sqrt{d_k}\, m_h \Delta$ (its own position,
$\Delta = 0$, has no penalty). With a wide window and zero position terms every head starts by averaging all the
positions it sees; a transformer that sees whole programs of the state-tracking task stayed at chance that way, and
learned with the recency slopes.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from labml_nn.transformers.feed_forward import FeedForward
from labml_nn.transformers.mha import PrepareForMultiHeadAttention
from labml_nn.transformers.pre_norm import PreNormLayer
from labml_nn.transformers.recency import recency_bias
from labml_nn.utils import check_memory_span, clone_module_list


@dataclass
class CausalState:
    """
    What a causal transformer needs to continue a sequence.

    * `keys[l]`, `values[l]`: cached keys/values of layer `l` for all earlier tokens,
      `[mem_len, batch_size, heads, d_k]`
    * `offset`: how many tokens came before (the position of the next token)
    """
    keys: List[torch.Tensor] = field(default_factory=list)
    values: List[torch.Tensor] = field(default_factory=list)
    offset: int = 0

    def detach(self) -> 'CausalState':
        """A copy that keeps the cached values but cuts the autograd graph (for memory carried across batches)."""
        return CausalState([k.detach() for k in self.keys], [v.detach() for v in self.values], self.offset)

    def to_payload(self) -> Dict[str, Any]:
        """The state as plain tensors and numbers, for a `weights_only` checkpoint (a copy, on the CPU)."""
        return {'kind': 'causal', 'offset': self.offset,
                'keys': [k.detach().cpu().clone() for k in self.keys],
                'values': [v.detach().cpu().clone() for v in self.values]}


class CausalAttention(nn.Module):
    """
    Multi-head causal self-attention with relative positions and a key/value cache.
    """

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.1, max_distance: int = 128, *,
                 memory_span: Optional[int] = None, recency_init: bool = False):
        super().__init__()
        if not isinstance(heads, int) or heads < 1 or d_model % heads != 0:
            raise ValueError(f"heads must be a positive int dividing d_model={d_model}, got {heads!r}")
        if not isinstance(max_distance, int) or max_distance < 1:
            raise ValueError(f"max_distance must be a positive int, got {max_distance!r}")
        check_memory_span(memory_span)
        # Attend to the last `memory_span` positions before the query and the query's own (`None`: all)
        self.memory_span = memory_span
        self.heads = heads
        self.d_k = d_model // heads
        self.max_distance = max_distance
        # $W_q$, $W_k$, $W_v$ and the output projection $W_o$
        self.query = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=False)
        self.key = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=False)
        self.value = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=False)
        self.output = nn.Linear(d_model, d_model)
        self.dropout_prob = dropout_prob
        # $u$: `[heads, d_k]`
        self.query_pos_bias = nn.Parameter(torch.zeros(heads, self.d_k))
        # $p_\Delta$: `[max_distance, heads, d_k]`
        self.key_pos_embeddings = nn.Parameter(torch.zeros(max_distance, heads, self.d_k))
        # $s_\Delta$: `[max_distance, heads]`
        self.key_pos_bias = nn.Parameter(torch.zeros(max_distance, heads))
        self.scale = 1 / math.sqrt(self.d_k)
        if recency_init:
            # Row $\Delta$ of the table holds distance $\Delta$: ALiBi's $-\sqrt{d_k}\, m_h \Delta$
            with torch.no_grad():
                self.key_pos_bias.copy_(recency_bias(max_distance, heads, self.d_k))

    def positions(self, mem_len: int, seq_len: int,
                  device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """
        For `seq_len` queries after `mem_len` cached keys: the distance table row of every (query, key) pair,
        `[seq_len, mem_len + seq_len]`, which pairs are hidden, and how many table rows are used. They depend only
        on the sizes, so `CausalTransformer` computes them once per call for all its layers.
        """
        # Distances $\Delta = i - j$ from query `i` (at position `mem_len + i`) to key `j`
        q_pos = torch.arange(mem_len, mem_len + seq_len, device=device)
        k_pos = torch.arange(mem_len + seq_len, device=device)
        dist = q_pos[:, None] - k_pos[None, :]
        # Keys after the query, or further back than the window, are masked; distances beyond the table use its
        # last entry
        hidden = dist < 0
        # The table rows any visible key uses: all, or with a window only distances $0 \dots S$
        rows = self.max_distance
        if self.memory_span is not None:
            hidden = hidden | (dist > self.memory_span)
            rows = min(rows, self.memory_span + 1)
        return dist.clamp(0, rows - 1), hidden, rows

    def forward(self, x: torch.Tensor, past_key: Optional[torch.Tensor] = None,
                past_value: Optional[torch.Tensor] = None,
                positions: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        `x`: `[seq_len, batch_size, d_model]` (already normalized);
        `past_key`, `past_value`: `[mem_len, batch_size, heads, d_k]` or `None`;
        `positions`: `self.positions(mem_len, seq_len, x.device)`, when the caller has them already.
        Returns the attention output `[seq_len, batch_size, d_model]` and the keys/values later tokens can see: all
        tokens so far, or with a `memory_span` $S$ the last $S$.
        """
        seq_len, batch_size, _ = x.shape
        # $q$, $k$, $v$: `[seq_len, batch_size, heads, d_k]`
        q = self.query(x)
        k = self.key(x)
        v = self.value(x)
        if past_key is not None:
            k = torch.cat([past_key, k], dim=0)
            v = torch.cat([past_value, v], dim=0)
        # Table rows of the (query, key) distances, `[seq_len, mem_len + seq_len]`, and the hidden pairs
        dist, hidden, rows = positions or self.positions(k.shape[0] - seq_len, seq_len, x.device)
        # $q_i^\top p_\Delta$ for those table entries, `[batch_size, heads, seq_len, rows]`,
        # then picked out by distance: `[batch_size, heads, seq_len, mem_len + seq_len]`
        q_p = torch.einsum('ibhd,phd->bhip', q, self.key_pos_embeddings[:rows])
        q_p = q_p.gather(-1, dist.expand(batch_size, self.heads, seq_len, -1))
        # $s_\Delta$: `[heads, seq_len, mem_len + seq_len]`
        s = self.key_pos_bias[dist].permute(2, 0, 1)
        # The position terms, scaled, with $-\infty$ on future keys: an additive mask for attention
        bias = ((q_p + s) * self.scale).masked_fill(hidden, float('-inf'))
        # $\mathrm{softmax}\big(((q + u)^\top k + q^\top p_\Delta + s_\Delta) / \sqrt{d_k}\big)\, v$,
        # in `[batch_size, heads, seq, d_k]` layout
        out = F.scaled_dot_product_attention((q + self.query_pos_bias).permute(1, 2, 0, 3),
                                             k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=bias,
                                             dropout_p=self.dropout_prob if self.training else 0.0)
        # Back to `[seq_len, batch_size, d_model]`, then $W_o$
        out = out.permute(2, 0, 1, 3).reshape(seq_len, batch_size, -1)
        if self.memory_span is not None:
            # Only the last $S$ keys and values can be seen by a later token
            k, v = k[-self.memory_span:], v[-self.memory_span:]
        return self.output(out), k, v


class CausalTransformerLayer(PreNormLayer):
    r"""
    One pre-norm layer: $x \leftarrow x + \mathrm{Drop}(\mathrm{Attn}(\mathrm{LN}(x)))$,
    then $x \leftarrow x + \mathrm{Drop}(\mathrm{FFN}(\mathrm{LN}(x)))$.
    """

    def __init__(self, *, d_model: int, attn: CausalAttention, feed_forward: FeedForward,
                 dropout_prob: float):
        # The parts and their names: [the pre-norm layer](pre_norm.html)
        super().__init__(d_model=d_model, attn=attn, feed_forward=feed_forward, dropout_prob=dropout_prob)

    def forward(self, x: torch.Tensor, past_key: Optional[torch.Tensor] = None,
                past_value: Optional[torch.Tensor] = None,
                positions: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, k, v = self.attn(self.norm_self_attn(x), past_key, past_value, positions)
        x = x + self.dropout(attn)
        return self.feed_forward_block(x), k, v


class CausalTransformer(nn.Module):
    """
    A stack of `n_layers` copies of `layer` and a final layer norm.
    Same call signature as the feedback transformers: `forward(x, state=None, return_state=False)`.

    * `memory_span`: every layer attends to its own position and the `memory_span` positions before it, and the
      state keeps that many keys and values per layer (`None`: the layer's own setting, by default unlimited)
    """

    def __init__(self, layer: CausalTransformerLayer, n_layers: int, *, memory_span: Optional[int] = None):
        super().__init__()
        check_memory_span(memory_span)
        self.layers = clone_module_list(layer, n_layers)
        if memory_span is not None:
            for copy in self.layers:
                copy.attn.memory_span = memory_span
        self.norm = nn.LayerNorm([layer.size])

    @property
    def memory_span(self) -> Optional[int]:
        """The attention window (`None`: unlimited)."""
        return self.layers[0].attn.memory_span

    def state_from_payload(self, payload: Dict[str, Any], device: torch.device) -> CausalState:
        """The state that `CausalState.to_payload()` saved (in a checkpoint), for this model, on `device`."""
        if payload.get('kind') != 'causal':
            raise ValueError("the carried state in the checkpoint is not a causal transformer's")
        keys = [k.to(device) for k in payload['keys']]
        values = [v.to(device) for v in payload['values']]
        attn = self.layers[0].attn
        if len(keys) != len(self.layers) or any(k.shape[2:] != (attn.heads, attn.d_k) for k in keys):
            raise ValueError(f"the carried state holds {len(keys)} layers of keys "
                             f"{[list(k.shape) for k in keys[:1]]}; this model has {len(self.layers)} "
                             f"layers of [n, batch_size, {attn.heads}, {attn.d_k}]")
        if self.memory_span is not None and any(k.shape[0] > self.memory_span for k in keys):
            raise ValueError(f"the carried state holds more keys than this model's "
                             f"memory_span={self.memory_span}")
        return CausalState(keys, values, int(payload['offset']))

    def forward(self, x: torch.Tensor, state: Optional[CausalState] = None,
                return_state: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, CausalState]]:
        """
        `x`: `[seq_len, batch_size, d_model]`; returns `[seq_len, batch_size, d_model]` (and the new state).
        """
        if x.dim() != 3 or x.shape[-1] != self.norm.normalized_shape[0]:
            raise ValueError(f"x must be [seq_len, batch_size, {self.norm.normalized_shape[0]}], "
                             f"got {list(x.shape)}")
        if state is not None:
            if not isinstance(state, CausalState):
                raise TypeError(f"state must be a CausalState, got {type(state).__name__}")
            if state.keys and (len(state.keys) != len(self.layers) or state.keys[0].shape[1] != x.shape[1]):
                raise ValueError(f"state holds {len(state.keys)} layers of batch size "
                                 f"{state.keys[0].shape[1]}; expected {len(self.layers)} layers of batch "
                                 f"size {x.shape[1]}")
        # Every layer has the same window and cache length: the distances and the mask once for all of them
        mem_len = state.keys[0].shape[0] if state is not None and state.keys else 0
        positions = self.layers[0].attn.positions(mem_len, x.shape[0], x.device)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            past_k = state.keys[i] if state is not None and state.keys else None
            past_v = state.values[i] if state is not None and state.values else None
            x, k, v = layer(x, past_k, past_v, positions)
            keys.append(k)
            values.append(v)
        out = self.norm(x)
        if not return_state:
            return out
        offset = (state.offset if state is not None else 0) + x.shape[0]
        return out, CausalState(keys, values, offset)

