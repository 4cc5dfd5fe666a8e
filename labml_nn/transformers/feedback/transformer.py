r"""
---
title: Feedback Transformer layers and the step-by-step loop
summary: The pre-norm layer, and the two Feedback Transformers (per-layer and shared key/value projections)
  that run the layers one token at a time over a cached, weighted-sum memory.
---

# The Feedback Transformer

A layer $l$ at step $t$ takes $x_t^{l-1}$ and computes, with pre-norm residual blocks,

$$x \leftarrow x + \mathrm{Drop}\big(\mathrm{Attn}(\mathrm{LN}(x),\ m_{<t})\big), \qquad
  x \leftarrow x + \mathrm{Drop}\big(\mathrm{FFN}(\mathrm{LN}(x))\big).$$

After the last layer the step's **memory vector** is a learned mixture of the embedding and every layer's
output,

$$m_t = \sum_{l=0}^{L} \mathrm{softmax}(w)_l \, x_t^l ,$$

and the output of the step is $\mathrm{LN}(x_t^L)$. Every layer of step $t+1$ attends to $m_t$, so even the
lowest layer sees the highest representations of the past: that is the *feedback*. It also means that the
steps must run one after the other.

## Project each memory vector once

A memory vector never changes, and neither do its keys $W_k^l m_t$ and values $W_v^l m_t$. We project
$m_t$ once, right after it is made, for all layers with a single matrix product, and append the result to a
`Stack`. A step then attends over a zero-copy view of the stack. (labml_nn's weighted variant re-projects
the whole memory at every step: $O(T^2)$ work and memory.)

* `FeedbackTransformer`: each layer has its own $W_k^l, W_v^l$; the cache holds $L$ key/value pairs per step.
* `FeedbackTransformerKV`: all layers share one $W_k, W_v$ (the paper's cheaper variant); the cache holds one.

## Work outside the loop

Only what depends on earlier steps runs inside the loop. The relative position terms are built once per call,
and the final layer norm runs on all outputs at once.

## Memory span

With `memory_span` $= S$ each step attends only to the last $S$ memory vectors, $m_{t-S} \dots m_{t-1}$ (the
paper's limited attention span). The cache keeps only what later steps can see, so a long generation costs the
same per token at its end as at its start. `memory_span` $\ge$ the sequence length is the unlimited model.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from labml_nn.transformers.feedback import fused as fused_loop
from labml_nn.transformers.feedback.attention import FeedbackAttention
from labml_nn.transformers.feedback.stack import Stack
from labml_nn.transformers.feedback.state import FeedbackState
from labml_nn.utils import clone_module_list


class FeedbackTransformerLayer(nn.Module):
    """
    One pre-norm layer: attention over the memory (skipped at the first step, when there is none), then the
    feed-forward network, each in a residual block with dropout.
    """

    def __init__(self, *, d_model: int, attn: FeedbackAttention, feed_forward: nn.Module, dropout_prob: float):
        super().__init__()
        if not isinstance(attn, FeedbackAttention):
            raise TypeError(f"attn must be a FeedbackAttention, got {type(attn).__name__}")
        if attn.d_model != d_model:
            raise ValueError(f"attn.d_model ({attn.d_model}) must equal d_model ({d_model})")
        self.size = d_model
        self.attn = attn
        self.feed_forward = feed_forward
        self.dropout = nn.Dropout(dropout_prob)
        self.norm_self_attn = nn.LayerNorm([d_model])
        self.norm_ff = nn.LayerNorm([d_model])

    def forward(self, *, x: torch.Tensor, key: Optional[torch.Tensor], value: Optional[torch.Tensor],
                pos_emb: Optional[torch.Tensor] = None, pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        * `x`: this step's input to the layer, `[batch_size, d_model]`
        * `key`, `value`: the visible memory's keys and values `[n, batch_size, heads, d_k]`, or `None` at the
          first step
        * `pos_emb`, `pos_bias`: precomputed relative position terms (see `FeedbackAttention`)
        """
        if key is not None:
            # $x + \mathrm{Drop}(\mathrm{Attn}(\mathrm{LN}(x), m_{<t}))$
            z = self.norm_self_attn(x)
            x = x + self.dropout(self.attn(query=z, key=key, value=value, pos_emb=pos_emb, pos_bias=pos_bias))
        # $x + \mathrm{Drop}(\mathrm{FFN}(\mathrm{LN}(x)))$
        return x + self.dropout(self.feed_forward(self.norm_ff(x)))


class _FeedbackLoop(nn.Module):
    r"""
    What both Feedback Transformers share: the layers, the memory weights $w$, the final norm, the state
    handling and the step loop. Subclasses say how the memory is projected to keys and values.
    """

    # Number of key/value groups in the cache (`n_layers`, or 1 when shared)
    groups: int

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int, memory_span: Optional[int], fused: bool,
                 memory_norm: bool):
        super().__init__()
        if not isinstance(layer, FeedbackTransformerLayer):
            raise TypeError(f"layer must be a FeedbackTransformerLayer, got {type(layer).__name__}")
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
        if memory_span is not None and (not isinstance(memory_span, int) or memory_span < 1):
            raise ValueError(f"memory_span must be None (unlimited) or an int >= 1, got {memory_span!r}")
        self.layers = clone_module_list(layer, n_layers)
        self.n_layers = n_layers
        self.d_model = layer.size
        self.heads = layer.attn.heads
        self.d_k = layer.attn.d_k
        self.memory_span = memory_span
        # Normalize each memory vector before its key/value projection (the authors' pre-norm memory)
        self.memory_norm = bool(memory_norm)
        # Train with the fused loop (`fused.py`) when the layers allow it
        self.fused = fused and fused_loop.supports(layer)
        # Final layer norm
        self.norm = nn.LayerNorm([layer.size])
        # $w \in \mathbb{R}^{L+1}$, the memory weights over the embedding and the $L$ layer outputs
        self.weights = nn.Parameter(torch.ones(n_layers + 1))

    def memory_weights(self) -> torch.Tensor:
        r"""$\mathrm{softmax}(w)$, `[n_layers + 1]`."""
        return torch.softmax(self.weights, dim=0)

    def _kv_weights(self) -> List[torch.Tensor]:
        """The key and value matrices of every group, `[W_k, W_v, ...]`, each `[d_model, d_model]`."""
        raise NotImplementedError

    def _memory_norms(self) -> List[nn.LayerNorm]:
        """The layer norm applied to the memory before each group's projection (with `memory_norm`)."""
        raise NotImplementedError

    def _kv_projection(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        r"""
        The key/value projection of all groups as one matrix `[groups * 2 * d_model, d_model]` and, with
        `memory_norm`, one bias `[groups * 2 * d_model]`: `F.linear(m, W, b)` gives every group's keys and values.

        With `memory_norm` group $g$ projects $\mathrm{LN}_g(m) = \hat m \odot \gamma_g + \beta_g$, where
        $\hat m = (m - \mu) / \sigma$ is the same for all groups. So the norm's gain folds into the matrix and its
        bias into a bias,

        $$W \mathrm{LN}_g(m) = (W \operatorname{diag} \gamma_g)\, \hat m + W \beta_g ,$$

        and one product of $\hat m$ still projects the memory for every group.
        """
        weights = self._kv_weights()
        if not self.memory_norm:
            return torch.cat(weights), None
        norms = self._memory_norms()
        # Two matrices (key, value) per norm
        folded = [w * norms[i // 2].weight for i, w in enumerate(weights)]
        biases = [w @ norms[i // 2].bias for i, w in enumerate(weights)]
        return torch.cat(folded), torch.cat(biases)

    def _memory_eps(self) -> float:
        # The $\epsilon$ of the memory's normalization (every group's norm has the same, checked at construction)
        return self._memory_norms()[0].eps if self.memory_norm else 0.0

    def forward(self, x_seq: torch.Tensor, state: Optional[FeedbackState] = None,
                return_state: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, FeedbackState]]:
        r"""
        * `x_seq`: embedded tokens `[seq_len, batch_size, d_model]`
        * `state`: a `FeedbackState` returned by an earlier call to continue from, or `None` to start with an
          empty memory
        * `return_state`: also return the state after the last step

        Returns `[seq_len, batch_size, d_model]`, and the state if asked for.
        """
        self._check_input(x_seq, state)
        if self.fused:
            if torch.is_grad_enabled():
                return self._forward_fused(x_seq, state, return_state)
            return self._forward_inference(x_seq, state, return_state)
        seq_len, batch_size, _ = x_seq.shape
        # The cache of keys and values, entries `[groups, 2, batch_size, heads, d_k]`
        if state is None:
            n_start, stack, visible = 0, Stack(seq_len, window=self.memory_span, dim=4), None
        else:
            n_start, stack, visible = state.n_steps, state.stack_for_continuation(), state.visible
            if torch.is_grad_enabled() and state.visible.requires_grad and state.kv.frozen >= n_start:
                raise ValueError("this state was made by the fused training loop and carries gradients: continue it "
                                 "with the same model settings (model.fused=True) or call state.detach() first")
        # Relative position terms for the most memory any step of this call sees
        n_visible = self._n_visible(n_start, seq_len)
        pos = [layer.attn.relative_terms(n_visible) if n_visible > 0 else (None, None) for layer in self.layers]
        # $\mathrm{softmax}(w)$ and the projection of memory vectors to keys and values, once per call
        mem_w = self.memory_weights()
        kv_w, kv_b = self._kv_projection()

        outputs: List[torch.Tensor] = []
        for i in range(seq_len):
            # Step $t$ = `n_start + i`; $x_t^0$, `[batch_size, d_model]`
            x = x_seq[i]
            layer_outputs = [x]
            for l, layer in enumerate(self.layers):
                if visible is None:
                    key = value = None
                else:
                    # Keys and values of the visible memory, as `[n, batch_size, heads, d_k]` views
                    g = l if self.groups > 1 else 0
                    key, value = visible[g, 0].permute(2, 0, 1, 3), visible[g, 1].permute(2, 0, 1, 3)
                x = layer(x=x, key=key, value=value, pos_emb=pos[l][0], pos_bias=pos[l][1])
                layer_outputs.append(x)
            outputs.append(x)
            # The memory of the last step is only needed by a later call
            if i == seq_len - 1 and not return_state:
                break
            # $m_t = \sum_l \mathrm{softmax}(w)_l x_t^l$, `[batch_size, d_model]`
            mem = torch.einsum('l,lbd->bd', mem_w, torch.stack(layer_outputs))
            if self.memory_norm:
                # $\hat m_t$; the groups' gains and biases are folded into `kv_w`, `kv_b`
                mem = F.layer_norm(mem, (self.d_model,), eps=self._memory_eps())
            # Its keys and values for all groups, `[groups, 2, batch_size, heads, d_k]`
            kv = F.linear(mem, kv_w, kv_b).view(batch_size, self.groups, 2, self.heads, self.d_k).permute(1, 2, 0, 3, 4)
            visible = stack.append(n_start + i, kv)

        # $\mathrm{LN}(x_t^L)$ for all steps at once
        out = self.norm(torch.stack(outputs))
        if return_state:
            return out, FeedbackState(stack, n_start + seq_len, visible)
        return out

    def _n_visible(self, n_start: int, seq_len: int) -> int:
        # The most memory vectors any step of a call sees
        n_visible = n_start + seq_len - 1
        return n_visible if self.memory_span is None else min(n_visible, self.memory_span)

    def _layer_tensors(self, n_visible: int) -> List[torch.Tensor]:
        """Each layer's tensors in the order of `fused.LAYER_TENSORS`."""
        tensors = []
        for layer in self.layers:
            attn, ff = layer.attn, layer.feed_forward
            pos_emb, pos_bias = attn.relative_terms(n_visible)
            tensors += [attn.query.linear.weight, attn.query_pos_bias, pos_emb, pos_bias, attn.output.weight,
                        attn.output.bias, layer.norm_self_attn.weight, layer.norm_self_attn.bias,
                        layer.norm_ff.weight, layer.norm_ff.bias, ff.layer1.weight, ff.layer1.bias,
                        ff.layer2.weight, ff.layer2.bias]
        return tensors

    def _inference_tensors(self, n_visible: int):
        r"""
        `_layer_tensors` split by layer, $\mathrm{softmax}(w)$ and the key/value matrix, for calls without autograd.
        Generation makes one call per token, so what depends only on the parameters is kept until they change.
        """
        params = self.__dict__.get('_params_list') or self.__dict__.setdefault('_params_list', list(self.parameters()))
        # Parameters made under `torch.inference_mode()` have no version counter: recompute every call then
        key = None if params[0].is_inference() else tuple((p._version, p.data_ptr()) for p in params)
        cached = self.__dict__.get('_inference_cache')
        if cached is None or key is None or cached[0] != key:
            layers = [list(t) for t in fused_loop.split_layers(self._loop_config(0, False, False),
                                                               self._layer_tensors(1))]
            cached = (key, layers, self.memory_weights(), *self._kv_projection())
            self.__dict__['_inference_cache'] = cached
        _, layers, mem_w, kv_w, kv_b = cached
        for layer, lt in zip(self.layers, layers):
            lt[2], lt[3] = layer.attn.relative_terms(n_visible)
        return [tuple(lt) for lt in layers], mem_w, kv_w, kv_b

    def _loop_config(self, n_start: int, return_state: bool, dropout: bool) -> fused_loop.LoopConfig:
        layer = self.layers[0]
        p_attn, p_resid, p_hidden = (layer.attn.dropout.p, layer.dropout.p, layer.feed_forward.dropout.p) \
            if dropout else (0.0, 0.0, 0.0)
        seed = int(torch.randint(2 ** 62, ())) if max(p_attn, p_resid, p_hidden) > 0 else 0
        cfg = fused_loop.LoopConfig(n_layers=self.n_layers, groups=self.groups, heads=self.heads, d_k=self.d_k,
                               eps=layer.norm_ff.eps, window=self.memory_span, p_attn=p_attn, p_resid=p_resid,
                               p_hidden=p_hidden, n_start=n_start, make_last_memory=return_state, seed=seed,
                               memory_norm=self.memory_norm, memory_eps=self._memory_eps())
        return cfg

    def _forward_fused(self, x_seq: torch.Tensor, state: Optional[FeedbackState], return_state: bool):
        """The same computation as `forward`, as one autograd function with a hand-written backward pass."""
        seq_len = x_seq.shape[0]
        n_start = 0 if state is None else state.n_steps
        tensors = self._layer_tensors(max(1, self._n_visible(n_start, seq_len)))
        cfg = self._loop_config(n_start, return_state, self.training)
        prev = None if state is None else state.visible
        out, cache = fused_loop.run_loop(cfg, x_seq, prev, self.memory_weights(), *self._kv_projection(), tensors)
        out = self.norm(out)
        if not return_state:
            return out
        # The state: the part of the cache the next step can see, its gradients flowing through `cache`
        n_end = n_start + seq_len
        first_row = n_start - (0 if prev is None else prev.shape[4])
        first_visible = 0 if self.memory_span is None else max(0, n_end - self.memory_span)
        visible = cache[..., first_visible - first_row:, :]
        stack = Stack.from_rows(visible, first_visible, window=self.memory_span, dim=4)
        return out, FeedbackState(stack, n_end, visible)

    def _forward_inference(self, x_seq: torch.Tensor, state: Optional[FeedbackState], return_state: bool):
        """
        Without autograd: the fused loop's steps, writing keys and values straight into the state's cache (no copy
        of the memory), so that generating one token costs one step.
        """
        seq_len, batch_size, _ = x_seq.shape
        if state is None:
            n_start, stack = 0, Stack(seq_len, window=self.memory_span, dim=4)
        else:
            n_start, stack = state.n_steps, state.stack_for_continuation()
        n_new = seq_len if return_state else seq_len - 1
        entry = x_seq.new_empty((self.groups, 2, batch_size, self.heads, self.d_k))
        cache, first = stack.reserve(n_new, entry)
        cfg = self._loop_config(n_start, return_state, False)
        layers, mem_w, kv_w, kv_b = self._inference_tensors(max(1, self._n_visible(n_start, seq_len)))
        out = fused_loop.run_steps(cfg, x_seq, layers, mem_w, kv_w, kv_b, cache, first)
        out = self.norm(out)
        if not return_state:
            return out
        return out, FeedbackState(stack, n_start + seq_len, stack.extended(n_new))

    def _check_input(self, x_seq: torch.Tensor, state: Optional[FeedbackState]) -> None:
        if not isinstance(x_seq, torch.Tensor):
            raise TypeError(f"x_seq must be a torch.Tensor of shape [seq_len, batch_size, d_model], "
                            f"got {type(x_seq).__name__}")
        if not x_seq.is_floating_point():
            raise TypeError(f"x_seq must be a floating point tensor (embedded tokens), got dtype {x_seq.dtype}")
        if x_seq.dim() != 3 or x_seq.shape[2] != self.d_model or x_seq.shape[0] < 1 or x_seq.shape[1] < 1:
            raise ValueError(f"x_seq must have shape [seq_len >= 1, batch_size >= 1, d_model={self.d_model}], "
                             f"got {list(x_seq.shape)}")
        if state is None:
            return
        if not isinstance(state, FeedbackState):
            raise TypeError(f"state must be a FeedbackState returned with return_state=True, "
                            f"got {type(state).__name__}")
        expected = (self.groups, 2, x_seq.shape[1], self.heads, self.d_k)
        entry = tuple(state.visible.shape[:4] + state.visible.shape[5:])
        if entry != expected:
            raise ValueError(f"state does not fit this call: its cache entries are {list(entry)}, "
                             f"expected {list(expected)} [groups, 2, batch_size, heads, d_k] "
                             f"(state batch size {state.batch_size}, x_seq batch size {x_seq.shape[1]})")
        if state.visible.dtype != x_seq.dtype or state.visible.device != x_seq.device:
            raise TypeError(f"state holds {state.visible.dtype} on {state.visible.device} but x_seq is "
                            f"{x_seq.dtype} on {x_seq.device}")
        if state.kv.window != self.memory_span:
            raise ValueError(f"state was made with memory_span={state.kv.window}, this model has "
                             f"memory_span={self.memory_span}")


class FeedbackTransformer(_FeedbackLoop):
    r"""
    The Feedback Transformer with a weighted-sum memory; each layer projects the memory with its own
    $W_k^l, W_v^l$.

    * `layer`: a `FeedbackTransformerLayer`, copied `n_layers` times (its attention must have its own
      key/value projections, `is_kv_precomputed=False`)
    * `memory_span`: attend to at most this many latest memory vectors (`None`: all)
    * `fused`: train with the fused loop of `fused.py` (same results, several times faster); `False` uses
      autograd over the module-by-module loop
    * `memory_norm`: layer $l$ projects $\mathrm{LN}^l(m_j)$ instead of $m_j$, with its own pre-attention norm
      `norm_self_attn` (as the authors' pre-norm code does); adds no parameters
    """

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int, *, memory_span: Optional[int] = None,
                 fused: bool = True, memory_norm: bool = False):
        if isinstance(layer, FeedbackTransformerLayer) and layer.attn.is_kv_precomputed:
            raise ValueError("FeedbackTransformer projects the memory with each layer's own key/value layers: build "
                             "its FeedbackAttention with is_kv_precomputed=False (or use FeedbackTransformerKV)")
        super().__init__(layer, n_layers, memory_span, fused, memory_norm)
        self.groups = n_layers

    def _kv_weights(self) -> List[torch.Tensor]:
        # $W_k^1, W_v^1, \dots, W_k^L, W_v^L$
        return [w for layer in self.layers for w in (layer.attn.key.linear.weight, layer.attn.value.linear.weight)]

    def _memory_norms(self) -> List[nn.LayerNorm]:
        # Layer $l$ normalizes the memory with its own pre-attention norm
        return [layer.norm_self_attn for layer in self.layers]


class FeedbackTransformerKV(_FeedbackLoop):
    r"""
    The Feedback Transformer whose layers share one key/value projection $W_k, W_v$ of the memory, so each
    memory vector is projected once for all layers.

    * `layer`: a `FeedbackTransformerLayer` whose attention has `is_kv_precomputed=True`
    * `d_model`, `heads`: sizes of the shared projections
    * `memory_span`: attend to at most this many latest memory vectors (`None`: all)
    * `fused`: as for `FeedbackTransformer`
    * `memory_norm`: project $\mathrm{LN}_m(m_j)$ instead of $m_j$, with one layer norm `norm_memory` shared by all
      layers (the authors share the pre-attention norm in this variant, so keys and values are normalized once)
    """

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int, d_model: int, heads: int, *,
                 memory_span: Optional[int] = None, fused: bool = True, memory_norm: bool = False):
        if isinstance(layer, FeedbackTransformerLayer):
            if not layer.attn.is_kv_precomputed:
                raise ValueError("FeedbackTransformerKV shares one key/value projection between layers: build the "
                                 "layer's FeedbackAttention with is_kv_precomputed=True")
            if layer.size != d_model or layer.attn.heads != heads:
                raise ValueError(f"d_model={d_model}, heads={heads} must match the layer's "
                                 f"(d_model={layer.size}, heads={layer.attn.heads})")
        super().__init__(layer, n_layers, memory_span, fused, memory_norm)
        self.groups = 1
        d_k = d_model // heads
        # $W_k$ and $W_v$, shared by all layers
        self.key = nn.Linear(d_model, heads * d_k, bias=False)
        self.value = nn.Linear(d_model, heads * d_k, bias=False)
        if self.memory_norm:
            # $\mathrm{LN}_m$, only with `memory_norm` (so labml_nn's parameters are unchanged without it)
            self.norm_memory = nn.LayerNorm([d_model])

    def _kv_weights(self) -> List[torch.Tensor]:
        # $W_k, W_v$
        return [self.key.weight, self.value.weight]

    def _memory_norms(self) -> List[nn.LayerNorm]:
        return [self.norm_memory]
