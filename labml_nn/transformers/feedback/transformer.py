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
$m_t$ once, right after it is made, for all layers with a single matrix product, and append the result to the
cache ([its layout](state.html#layout)). A step then attends over a zero-copy view of the cache
([stack.py](stack.html)). (labml_nn's weighted variant re-projects the whole memory at every step: $O(T^2)$ work
and memory.)

* `FeedbackTransformer`: each layer has its own $W_k^l, W_v^l$; the cache holds $L$ key/value pairs per step.
* `FeedbackTransformerKV`: all layers share one $W_k, W_v$ (the paper's cheaper variant); the cache holds one.

## Memory normalization

The authors' code (in its pre-norm mode) projects a **layer-normalized** memory, $k_j = W_k\, \mathrm{LN}(m_j)$,
and so does `memory_norm=True`: each layer uses its own pre-attention norm, and the KV variant one norm shared by
all layers. Without it (labml_nn's model) the memory is a linear mix of the layers' residual streams, and when
memory is carried over many training batches nothing stops it from growing step after step.

In the weighted variant the setting adds no parameter, so the weights alone do not say whether they were trained
with it. The state dict says it: `memory_norm` is saved with the weights (as the module's extra state), and
loading weights into a model with the other setting is an error. State dicts without it (labml_nn's, older
checkpoints) load as before.

## Memory span

With `memory_span` $= S$ each step attends only to the last $S$ memory vectors, $m_{t-S} \dots m_{t-1}$ (the
paper's limited attention span; [`first_visible`](stack.html#first_visible) is the rule). The cache keeps only
what later steps can see, so a long generation costs the same per token at its end as at its start.
`memory_span` $\ge$ the sequence length is the unlimited model.

## Three ways to run the same function

This page is the model as the paper writes it: `forward` runs the layers above step by step, with autograd
recording every operation. Two fast paths compute exactly the same function, each one call from `forward` that
takes the transformer as its argument:

* `fused_forward` ([fused.py](fused.html)), with autograd (training): the whole loop as one autograd function
  with a hand-written backward pass ([fused_backward.py](fused_backward.html));
* `inference_forward` ([inference.py](inference.html)), without autograd (evaluation, generation): the same
  steps ([fused_steps.py](fused_steps.html)) straight into the state's cache.

`fused=False` keeps the module loop. `compile=True` runs the inference steps compiled with `torch.compile`, over
fixed shapes ([compiled.py](compiled.html)).
"""

from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from labml_nn.transformers.feedback.attention import FeedbackAttention
from labml_nn.transformers.feedback.compiled import CompiledStep, compile_mode
from labml_nn.transformers.feedback.fused import fused_forward
from labml_nn.transformers.feedback.fused_steps import products_dtype, supports
from labml_nn.transformers.feedback.inference import InferenceCache, inference_forward
from labml_nn.transformers.feedback.stack import Stack, n_visible
from labml_nn.transformers.feedback.state import FeedbackState
from labml_nn.transformers.feedback.static_step import TokenDecoder, run_compiled_steps, token_decoder
from labml_nn.transformers.pre_norm import PreNormLayer
from labml_nn.utils import check_memory_span, clone_module_list

# The state-dict key of a module's extra state, after its prefix (PyTorch's name, `get_extra_state`)
_EXTRA_STATE = '_extra_state'


class FeedbackTransformerLayer(PreNormLayer):
    """
    One pre-norm layer: attention over the memory (skipped at the first step, when there is none), then the
    feed-forward network, each in a residual block with dropout.
    """

    def __init__(self, *, d_model: int, attn: FeedbackAttention, feed_forward: nn.Module,
                 dropout_prob: float):
        if not isinstance(attn, FeedbackAttention):
            raise TypeError(f"attn must be a FeedbackAttention, got {type(attn).__name__}")
        if attn.d_model != d_model:
            raise ValueError(f"attn.d_model ({attn.d_model}) must equal d_model ({d_model})")
        # The parts and their names: [the pre-norm layer](../pre_norm.html)
        super().__init__(d_model=d_model, attn=attn, feed_forward=feed_forward, dropout_prob=dropout_prob)

    def forward(self, *, x: torch.Tensor, key: Optional[torch.Tensor], value: Optional[torch.Tensor],
                pos_emb: Optional[torch.Tensor] = None,
                pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
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
        return self.feed_forward_block(x)


class _FeedbackLoop(nn.Module):
    r"""
    What both Feedback Transformers share: the layers, the memory weights $w$, the final norm, the state
    handling and the step loop. Subclasses say how the memory is projected to keys and values.
    """

    # Number of key/value groups in the cache (`n_layers`, or 1 when shared)
    groups: int

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int, memory_span: Optional[int],
                 fused: bool, memory_norm: bool, compile: Union[bool, str, None]):
        super().__init__()
        if not isinstance(layer, FeedbackTransformerLayer):
            raise TypeError(f"layer must be a FeedbackTransformerLayer, got {type(layer).__name__}")
        if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
            raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
        check_memory_span(memory_span)
        self.layers = clone_module_list(layer, n_layers)
        self.n_layers = n_layers
        self.d_model = layer.size
        self.heads = layer.attn.heads
        self.d_k = layer.attn.d_k
        self.memory_span = memory_span
        # Normalize each memory vector before its key/value projection (the authors' pre-norm memory)
        self.memory_norm = bool(memory_norm)
        # Train with the fused loop when the layers' building blocks allow it
        self.fused = fused and supports(layer)
        # Final layer norm
        self.norm = nn.LayerNorm([layer.size])
        # $w \in \mathbb{R}^{L+1}$, the memory weights over the embedding and the $L$ layer outputs
        self.weights = nn.Parameter(torch.ones(n_layers + 1))
        # What inference derives from the parameters, kept between calls while they are unchanged
        # ([inference.py](inference.html))
        self.inference_cache = InferenceCache()
        # Inference with the compiled fixed-shape step ([compiled.py](compiled.html)): compiled at the first call,
        # after checking the compiler that call's device needs
        mode = compile_mode(compile)
        if mode is not None and not self.fused:
            raise ValueError("compile=True runs the fused loop's steps compiled: it needs fused=True and the "
                             "standard building blocks (a ReLU FeedForward with biases, affine layer norms)")
        self.compiled_step = None if mode is None else CompiledStep(mode)

    def memory_weights(self) -> torch.Tensor:
        r"""$\mathrm{softmax}(w)$, `[n_layers + 1]`."""
        return torch.softmax(self.weights, dim=0)

    def kv_weights(self) -> List[torch.Tensor]:
        """The key and value matrices of every group, `[W_k, W_v, ...]`, each `[heads * d_k, d_model]`."""
        raise NotImplementedError

    def memory_norms(self) -> List[nn.LayerNorm]:
        """The layer norm each group applies to the memory before its projection (with `memory_norm`)."""
        raise NotImplementedError

    def kv_projection(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        r"""
        The key/value projection of all groups as one matrix `[groups * 2 * d_model, d_model]` and, with
        `memory_norm`, one bias `[groups * 2 * d_model]`: `F.linear(m, W, b)` gives every group's keys and values.

        With `memory_norm` group $g$ projects $\mathrm{LN}_g(m) = \hat m \odot \gamma_g + \beta_g$, where
        $\hat m = (m - \mu) / \sigma$ is the same for all groups. So the norm's gain folds into the matrix and its
        bias into a bias,

        $$W\, \mathrm{LN}_g(m) = (W \operatorname{diag} \gamma_g)\, \hat m + W \beta_g ,$$

        and one product of $\hat m$ still projects the memory for every group.
        """
        weights = self.kv_weights()
        if not self.memory_norm:
            return torch.cat(weights), None
        norms = self.memory_norms()
        # Keys and values of group $g$ are `weights[2g]` and `weights[2g + 1]`
        folded = [w * norms[i // 2].weight for i, w in enumerate(weights)]
        biases = [w @ norms[i // 2].bias for i, w in enumerate(weights)]
        return torch.cat(folded), torch.cat(biases)

    def memory_eps(self) -> float:
        r"""The $\epsilon$ of the memory's normalization (every group's norm has the same: they are copies)."""
        return self.memory_norms()[0].eps if self.memory_norm else 0.0

    def get_extra_state(self) -> torch.Tensor:
        """
        Saved in the state dict beside the weights: `memory_norm`, which changes what the weights compute. A
        0-dimensional bool tensor, as every other entry of a state dict is a tensor.
        """
        return torch.tensor(self.memory_norm)

    def set_extra_state(self, state: Any) -> None:
        """Check the `memory_norm` saved with the weights: weights made with the other setting are an error."""
        if not isinstance(state, torch.Tensor) or state.numel() != 1:
            raise ValueError(f"the state dict's extra state for {type(self).__name__} should be its memory_norm "
                             f"setting (a bool tensor), got {state!r}")
        saved = bool(state)
        if saved != self.memory_norm:
            raise ValueError(f"the state dict was saved from a {type(self).__name__} with memory_norm={saved}, but "
                             f"this {type(self).__name__} has memory_norm={self.memory_norm}: build it with "
                             f"memory_norm={saved} to load these weights")

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args) -> None:
        # A state dict without the setting (labml_nn's, or a checkpoint saved before it was kept) loads as before:
        # this model's own setting stands in for it (`load_state_dict` hands modules a copy of the dict to change)
        key = prefix + _EXTRA_STATE
        if key not in state_dict:
            state_dict[key] = self.get_extra_state()
        super()._load_from_state_dict(state_dict, prefix, *args)

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
        if x_seq.dtype != self.weights.dtype:
            # Under autocast (checked above): the residual stream keeps the parameters' precision
            x_seq = x_seq.to(self.weights.dtype)
        if self.fused:
            # The same function, fast
            if torch.is_grad_enabled():
                # Training: the whole loop as one autograd function ([fused.py](fused.html))
                return fused_forward(self, x_seq, state, return_state)
            # Without autograd: the same steps, straight into the state's cache ([inference.py](inference.html)),
            # with `compile` one compiled step over fixed shapes per position ([static_step.py](static_step.html))
            steps = None if self.compiled_step is None else partial(run_compiled_steps, self.compiled_step)
            return inference_forward(self, x_seq, state, return_state, steps)

        # The loop as the paper writes it: the layers step by step, autograd recording every operation
        seq_len, batch_size, _ = x_seq.shape
        # The cache of keys and values ([layout](state.html#layout)) and what the first step sees
        if state is None:
            n_start, stack, visible = 0, Stack(seq_len, memory_span=self.memory_span, dim=4), None
        else:
            n_start, stack, visible = state.n_steps, state.stack_for_continuation(), state.visible
            if torch.is_grad_enabled() and state.visible.requires_grad and state.kv.frozen >= n_start:
                raise ValueError("this state was made by the fused training loop and carries gradients: "
                                 "continue it with the same model settings (model.fused=True) or call "
                                 "state.detach() first")
        # Relative position terms for the most memory any step of this call sees (the last step's)
        n_max = n_visible(n_start + seq_len - 1, self.memory_span)
        pos = [layer.attn.relative_terms(n_max) if n_max > 0 else (None, None) for layer in self.layers]
        # $\mathrm{softmax}(w)$ and the projection of memory vectors to keys and values, once per call
        mem_w = self.memory_weights()
        kv_w, kv_b = self.kv_projection()

        outputs: List[torch.Tensor] = []
        for i in range(seq_len):
            # Step $t$ = `n_start + i`; $x_t^0$, `[batch_size, d_model]`
            x = x_seq[i]
            layer_outputs = [x]
            for l, layer in enumerate(self.layers):
                if visible is None:
                    key = value = None
                else:
                    # Group $g$'s keys and values of the visible memory, as `[n, batch_size, heads, d_k]` views
                    g = l if self.groups > 1 else 0
                    key, value = visible[g, 0].permute(2, 0, 1, 3), visible[g, 1].permute(2, 0, 1, 3)
                x = layer(x=x, key=key, value=value, pos_emb=pos[l][0], pos_bias=pos[l][1])
                layer_outputs.append(x)
            outputs.append(x)
            # The memory of the last step is only needed by a later call
            if i == seq_len - 1 and not return_state:
                break
            # $m_t = \sum_l \mathrm{softmax}(w)_l x_t^l$, `[batch_size, d_model]` (element-wise, so that autocast
            # keeps it in the residual stream's precision)
            mem = (mem_w[:, None, None] * torch.stack(layer_outputs)).sum(0)
            if self.memory_norm:
                # $\hat m_t$; the groups' gains and biases are folded into `kv_w`, `kv_b`
                mem = F.layer_norm(mem, (self.d_model,), eps=self.memory_eps())
            # Its keys and values for all groups, `[batch_size, groups, 2, heads, d_k]`, as a cache entry
            # `[groups, 2, batch_size, heads, d_k]`
            kv = F.linear(mem, kv_w, kv_b).view(batch_size, self.groups, 2, self.heads, self.d_k)
            visible = stack.append(n_start + i, kv.permute(1, 2, 0, 3, 4))

        # $\mathrm{LN}(x_t^L)$ for all steps at once
        out = self.norm(torch.stack(outputs))
        if return_state:
            return out, FeedbackState(stack, n_start + seq_len, visible)
        return out

    def token_decoder(self, embedding: nn.Module, head: nn.Module, like: torch.Tensor) -> Optional[TokenDecoder]:
        """
        Generation's per-token call as one compiled function between `embedding` and `head`, on `like`'s device
        ([static_step.py](static_step.html#decoding)): with `compile=` and the standard modules, else `None`.
        """
        return token_decoder(self, embedding, head, like)

    def cache_dtype(self, x_seq: torch.Tensor) -> torch.dtype:
        """The dtype of the keys and values a call makes: the products' (under autocast), else the parameters'."""
        return products_dtype(x_seq, self.weights.dtype) or self.weights.dtype

    def state_from_payload(self, payload: dict, device: torch.device) -> FeedbackState:
        """The state that `FeedbackState.to_payload()` saved (in a checkpoint), for this model, on `device`."""
        state = FeedbackState.from_payload(payload, device, self.memory_span)
        entry = tuple(state.visible.shape[:2] + state.visible.shape[3:4] + state.visible.shape[5:])
        if entry != (self.groups, 2, self.heads, self.d_k):
            raise ValueError(f"the carried state's cache entries are {list(entry)}, this model's "
                             f"{[self.groups, 2, self.heads, self.d_k]} [groups, 2, heads, d_k]")
        return state

    def _check_input(self, x_seq: torch.Tensor, state: Optional[FeedbackState]) -> None:
        if not isinstance(x_seq, torch.Tensor):
            raise TypeError(f"x_seq must be a torch.Tensor of shape [seq_len, batch_size, d_model], "
                            f"got {type(x_seq).__name__}")
        if not x_seq.is_floating_point():
            raise TypeError(f"x_seq must be a floating point tensor (embedded tokens), "
                            f"got dtype {x_seq.dtype}")
        if x_seq.dim() != 3 or x_seq.shape[2] != self.d_model or x_seq.shape[0] < 1 or x_seq.shape[1] < 1:
            raise ValueError(f"x_seq must have shape [seq_len >= 1, batch_size >= 1, "
                             f"d_model={self.d_model}], got {list(x_seq.shape)}")
        param = self.weights
        if x_seq.dtype != param.dtype and not torch.is_autocast_enabled(x_seq.device.type):
            raise TypeError(f"x_seq is {x_seq.dtype} but the model's parameters are {param.dtype}: convert "
                            f"one to the other (e.g. model.to({x_seq.dtype})), or run under torch.autocast")
        if x_seq.device != param.device:
            raise ValueError(f"x_seq is on {x_seq.device} but the model is on {param.device}")
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
        if state.visible.device != x_seq.device:
            raise TypeError(f"state is on {state.visible.device} but x_seq is on {x_seq.device}")
        if state.visible.dtype != self.cache_dtype(x_seq):
            raise TypeError(f"state holds {state.visible.dtype} keys and values but this call makes "
                            f"{self.cache_dtype(x_seq)} ones: continue a state in the precision it was "
                            f"made in (the same model dtype, under the same torch.autocast)")
        if state.memory_span != self.memory_span:
            raise ValueError(f"state was made with memory_span={state.memory_span}, this model has "
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
      `norm_self_attn` (as the authors' pre-norm code does); adds no parameters, but is saved in the state dict, so
      weights load only into a model with the same setting
    * `compile`: run inference (calls without autograd: evaluation, generation) through the fused loop's step
      compiled with `torch.compile` over fixed shapes ([compiled.py](compiled.html)): `True` or `'default'`,
      `'reduce-overhead'` (CUDA graphs on a GPU); `False` or `None`: eager. Needs `fused=True`
    """

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int, *, memory_span: Optional[int] = None,
                 fused: bool = True, memory_norm: bool = False, compile: Union[bool, str, None] = False):
        if isinstance(layer, FeedbackTransformerLayer) and layer.attn.is_kv_precomputed:
            raise ValueError("FeedbackTransformer projects the memory with each layer's own key/value "
                             "layers: build its FeedbackAttention with is_kv_precomputed=False (or use "
                             "FeedbackTransformerKV)")
        super().__init__(layer, n_layers, memory_span, fused, memory_norm, compile)
        self.groups = n_layers

    def kv_weights(self) -> List[torch.Tensor]:
        # $W_k^1, W_v^1, \dots, W_k^L, W_v^L$
        return [w for layer in self.layers
                for w in (layer.attn.key.linear.weight, layer.attn.value.linear.weight)]

    def memory_norms(self) -> List[nn.LayerNorm]:
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
    * `compile`: as for `FeedbackTransformer`
    """

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int, d_model: int, heads: int, *,
                 memory_span: Optional[int] = None, fused: bool = True, memory_norm: bool = False,
                 compile: Union[bool, str, None] = False):
        if isinstance(layer, FeedbackTransformerLayer):
            if not layer.attn.is_kv_precomputed:
                raise ValueError("FeedbackTransformerKV shares one key/value projection between layers: "
                                 "build the layer's FeedbackAttention with is_kv_precomputed=True")
            if layer.size != d_model or layer.attn.heads != heads:
                raise ValueError(f"d_model={d_model}, heads={heads} must match the layer's "
                                 f"(d_model={layer.size}, heads={layer.attn.heads})")
        super().__init__(layer, n_layers, memory_span, fused, memory_norm, compile)
        self.groups = 1
        d_k = d_model // heads
        # $W_k$ and $W_v$, shared by all layers
        self.key = nn.Linear(d_model, heads * d_k, bias=False)
        self.value = nn.Linear(d_model, heads * d_k, bias=False)
        if self.memory_norm:
            # $\mathrm{LN}_m$, only with `memory_norm` (so labml_nn's parameters are unchanged without it)
            self.norm_memory = nn.LayerNorm([d_model])

    def kv_weights(self) -> List[torch.Tensor]:
        # $W_k, W_v$
        return [self.key.weight, self.value.weight]

    def memory_norms(self) -> List[nn.LayerNorm]:
        return [self.norm_memory]
