r"""
---
title: Fast paths of the Feedback Transformer
summary: How a Feedback Transformer hands its parameters to the fused training loop and to the inference steps,
  keeps what it derives from them between generation steps, and turns the loop's cache into a state.
---

# Fast paths

[transformer.py](transformer.html) writes the model as the paper does, a loop over modules. That loop is what
autograd sees, step by step, layer by layer, which at training sizes costs more than the arithmetic. Two paths
compute the same function faster; this mixin connects them to the modules:

* **Training** (`_forward_fused`, autograd on): the whole loop is one autograd function
  ([fused.py](fused.html)) with a hand-written backward pass ([fused_backward.py](fused_backward.html)). The
  module gathers each layer's tensors into a `LayerWeights` record and the loop settings into a `LoopConfig`;
  everything computed from parameters *outside* the loop (the folded key/value matrix, $\mathrm{softmax}(w)$, the
  relative position terms) stays in autograd, so their gradients flow back to the parameters.
* **Inference** (`_forward_inference`, autograd off): the fused loop's steps alone, writing each new key/value
  entry straight into the state's cache, so generating a token costs one step.

## Keeping parameter-derived tensors

Generation calls the model once per token, and each call would rebuild the same tensors from the parameters. So
inference keeps them (`ParameterCache`) until a parameter changes: the cache is keyed on every parameter's
version counter (bumped by in-place updates such as an optimizer step) and data pointer (a new tensor, e.g. after
`.to()`), and on a counter of parameter and module registrations in the process, so that replacing a parameter
object (`load_state_dict(..., assign=True)`) also invalidates it. Parameters made under `torch.inference_mode()`
have no version counters: nothing is kept for them.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from labml_nn.transformers.feedback import fused as fused_loop
from labml_nn.transformers.feedback.fused_records import LayerWeights, LoopConfig, for_products
from labml_nn.transformers.feedback.stack import Stack, first_visible, n_visible
from labml_nn.transformers.feedback.state import FeedbackState

# How many times any module in this process registered a parameter or a submodule: part of the cache key, so a
# replaced parameter object is noticed without walking the module tree on every call
_registrations = 0


def _count_registration(*_args) -> None:
    global _registrations
    _registrations += 1


register_module_parameter_registration_hook(_count_registration)
register_module_module_registration_hook(_count_registration)


class _Cached(NamedTuple):
    """What inference derives from the parameters: for position terms of up to `size` memory slots."""
    key: tuple
    size: int
    layers: List[LayerWeights]
    mem_w: torch.Tensor
    kv_w: torch.Tensor
    kv_b: Optional[torch.Tensor]


class ParameterCache:
    """Tensors derived from a module's parameters, kept until a parameter changes (see above)."""

    def __init__(self):
        self.registrations = -1
        self.params: List[torch.Tensor] = []
        self.value: Optional[_Cached] = None

    def key(self, module: torch.nn.Module) -> Optional[tuple]:
        """The parameters' current versions, or `None` when they have none (inference tensors)."""
        if self.registrations != _registrations:
            # Walking the module tree costs more than a generation step's arithmetic at small sizes: walk it again
            # only when some parameter or module was registered since the last walk
            self.params = list(module.parameters())
            self.registrations = _registrations
        if self.params[0].is_inference():
            return None
        return tuple((p._version, p.data_ptr()) for p in self.params)


class FastPaths:
    """The fast paths of `_FeedbackLoop` (a mixin: it reads the transformer's modules and settings)."""

    def _loop_weights(self, n: int) -> List[LayerWeights]:
        """Each layer's tensors as the fused loop reads them, with position terms for `n` memory slots."""
        weights = []
        for layer in self.layers:
            attn, ff = layer.attn, layer.feed_forward
            # $p_\Delta, s_\Delta$ for distances $n \dots 1$ (made with autograd when it is on: their gradients
            # reach the position tables through this gather)
            pos_emb, pos_bias = attn.relative_terms(n)
            # The parameters themselves (no copies): the fused loop's gradients for them are the parameters' own
            weights.append(LayerWeights(
                w_q=attn.query.linear.weight, u=attn.query_pos_bias, pos_emb=pos_emb, pos_bias=pos_bias,
                w_o=attn.output.weight, b_o=attn.output.bias,
                ln1_w=layer.norm_self_attn.weight, ln1_b=layer.norm_self_attn.bias,
                ln2_w=layer.norm_ff.weight, ln2_b=layer.norm_ff.bias,
                w_1=ff.layer1.weight, b_1=ff.layer1.bias, w_2=ff.layer2.weight, b_2=ff.layer2.bias))
        return weights

    def _loop_config(self, n_start: int, return_state: bool, dropout: bool,
                     dtype: Optional[torch.dtype]) -> LoopConfig:
        # All layers are copies of one: the first one's settings are everyone's
        layer = self.layers[0]
        p_attn, p_resid, p_hidden = (layer.attn.dropout.p, layer.dropout.p, layer.feed_forward.dropout.p) \
            if dropout else (0.0, 0.0, 0.0)
        # The dropout masks' seed comes from the global generator, so `torch.manual_seed` reproduces a step
        seed = int(torch.randint(2 ** 62, ())) if max(p_attn, p_resid, p_hidden) > 0 else 0
        return LoopConfig(n_layers=self.n_layers, groups=self.groups, heads=self.heads, d_k=self.d_k,
                          eps=layer.norm_ff.eps, memory_span=self.memory_span, p_attn=p_attn, p_resid=p_resid,
                          p_hidden=p_hidden, n_start=n_start, make_last_memory=return_state, seed=seed,
                          memory_norm=self.memory_norm, memory_eps=self.memory_eps(), dtype=dtype)

    def products_dtype(self, x_seq: torch.Tensor) -> Optional[torch.dtype]:
        """Under `torch.autocast`: the dtype of matrix products, when it differs from the parameters'."""
        dtype = fused_loop.autocast_dtype(x_seq.device.type)
        return None if dtype == self.weights.dtype else dtype

    def cache_dtype(self, x_seq: torch.Tensor) -> torch.dtype:
        """The dtype of the keys and values a call makes: the products' (under autocast), else the parameters'."""
        return self.products_dtype(x_seq) or self.weights.dtype

    # ## Training: one autograd function

    def _forward_fused(self, x_seq: torch.Tensor, state: Optional[FeedbackState], return_state: bool):
        """The module loop's computation as one autograd function with a hand-written backward pass."""
        seq_len = x_seq.shape[0]
        # Absolute steps `n_start .. n_end - 1` of the sequence
        n_start = 0 if state is None else state.n_steps
        n_end = n_start + seq_len
        # Position terms for the most memory any step of this call sees: the last step's (at least one row, so the
        # tensors have a shape even when no step attends)
        layers = self._loop_weights(max(1, n_visible(n_end - 1, self.memory_span)))
        cfg = self._loop_config(n_start, return_state, self.training, self.products_dtype(x_seq))
        # The cache the first step attends to (it carries the earlier calls' autograd history, unless detached)
        prev = None if state is None else state.visible
        kv_w, kv_b = self.kv_projection()
        out, cache = fused_loop.run_loop(cfg, x_seq, prev, self.memory_weights(), kv_w, kv_b, layers)
        out = self.norm(out)
        if not return_state:
            return out
        # The state: the part of the cache that the next step sees, its gradients flowing through `cache` (whose
        # slot 0 is the first of the `prev` entries)
        first_row = n_start - (0 if prev is None else prev.shape[4])
        visible = cache[..., first_visible(n_end, self.memory_span) - first_row:, :]
        return out, FeedbackState.from_cache(visible, n_end, self.memory_span)

    # ## Inference: steps straight into the cache

    def _forward_inference(self, x_seq: torch.Tensor, state: Optional[FeedbackState], return_state: bool):
        """
        Without autograd: the fused loop's steps, writing keys and values straight into the state's cache (no copy
        of the memory), so that generating one token costs one step.
        """
        seq_len, batch_size, _ = x_seq.shape
        # The cache to write into: a new one, or the state's (a fork when it was continued already)
        if state is None:
            n_start, stack = 0, Stack(seq_len, memory_span=self.memory_span, dim=4)
        else:
            n_start, stack = state.n_steps, state.stack_for_continuation()
        # The last step's memory is only made when a later call will need it
        n_new = seq_len if return_state else seq_len - 1
        dtype = self.products_dtype(x_seq)
        entry = x_seq.new_empty((self.groups, 2, batch_size, self.heads, self.d_k),
                                dtype=dtype or self.weights.dtype)
        # Room for the new entries in one buffer that also holds every entry they attend to; slot 0 of `cache` is
        # absolute step `first`, as the fused loop's work buffer
        cache, first = stack.reserve(n_new, entry)
        cfg = self._loop_config(n_start, return_state, False, dtype)
        layers, mem_w, kv_w, kv_b = self._inference_weights(max(1, n_visible(n_start + seq_len - 1,
                                                                             self.memory_span)), entry.dtype)
        out = self.norm(fused_loop.run_steps(cfg, x_seq, layers, mem_w, kv_w, kv_b, cache, first))
        if not return_state:
            return out
        # The steps wrote their entries; the stack now counts them and hands out the view the next step sees
        return out, FeedbackState(stack, n_start + seq_len, stack.extended(n_new))

    def _inference_weights(self, n: int, dtype: torch.dtype) -> Tuple[List[LayerWeights], torch.Tensor,
                                                                       torch.Tensor, Optional[torch.Tensor]]:
        r"""
        `_loop_weights(n)`, $\mathrm{softmax}(w)$ and the key/value projection, with the product weights in `dtype`,
        from the cache when the parameters (and `dtype`) have not changed. Position terms are kept for up to `size`
        slots (doubling when more are needed): the terms for `n` slots are the last `n` rows of any longer ones.
        """
        # Kept in the instance's `__dict__`, not as a module attribute: it is not state to save or move
        cache: ParameterCache = self.__dict__.setdefault('_parameter_cache', ParameterCache())
        key = cache.key(self)
        key = None if key is None else (dtype, key)
        c = cache.value
        if key is None or c is None or c.key != key or c.size < n:
            # Parameters changed: rebuild for `n` slots; only more slots needed: double, so that a generation of
            # $T$ tokens rebuilds $O(\log T)$ times
            size = n if key is None or c is None or c.key != key else max(n, 2 * c.size)
            kv_w, kv_b = self.kv_projection()
            layers = [for_products(lw, dtype) for lw in self._loop_weights(size)]
            c = _Cached(key, size, layers, self.memory_weights(), kv_w.to(dtype),
                        None if kv_b is None else kv_b.to(dtype))
            cache.value = None if key is None else c
        # Distances $n \dots 1$ are the last `n` rows of the kept $N \dots 1$
        layers = [lw._replace(pos_emb=lw.pos_emb[-n:], pos_bias=lw.pos_bias[-n:]) for lw in c.layers]
        return layers, c.mem_w, c.kv_w, c.kv_b
