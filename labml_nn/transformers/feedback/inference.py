r"""
---
title: Inference, one step per token
summary: The Feedback Transformer without autograd (evaluation, generation) - the fused loop's steps writing each
  new key/value entry straight into the state's cache, so that generating a token costs one step, with what is
  derived from the parameters kept between calls while they are unchanged.
---

# Inference

Without autograd there is no graph to record and no backward pass to prepare for: a call runs
[the fused loop's steps](fused_steps.html) and keeps nothing but the state. Each step's keys and values go
straight into the state's cache: the `Stack` reserves room for the call's new entries in one buffer that also
holds every entry they attend to, the steps write them there, and the stack then counts them. No copy of the
memory is made, so that generating a token from a state ([autoregressive.py](autoregressive.html)) costs one step
whatever the length of the text so far, but for the attention over it.

## Keeping what is derived from the parameters

Generation calls the model once per token, and each call would rebuild the same tensors from the parameters: the
folded key/value matrix, $\mathrm{softmax}(w)$ and the relative position terms, a few dozen small operations that
cost about a third of a generation step at the benchmarks' sizes on a CPU. So each transformer owns an
`InferenceCache` that keeps them while its parameters are unchanged. It must never hand out stale values, and it
checks on every call, without walking the module tree (which costs more than it saves), that

* every parameter is still the same object at the same place in the module tree: nothing replaced a parameter
  (`load_state_dict(..., assign=True)`, an assignment, `torch.func.functional_call`) or a submodule on the way
  to it;
* every parameter has the same contents: the same version counter, which every in-place change bumps (an
  optimizer step, `load_state_dict`'s copy), and the same storage (`.to()`, a new `.data`);
* the settings it was made for (`memory_norm`, the products' dtype) are the same.

Changing a parameter through `.data` in place escapes the version counter (as it escapes autograd). Parameters
made under `torch.inference_mode()` have no version counter: nothing is kept for them.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Protocol, Tuple, Union

import torch
from torch import nn

from labml_nn.transformers.feedback.fused_records import LayerWeights, LoopConfig
from labml_nn.transformers.feedback.fused_steps import (
    FeedbackModel,
    loop_config,
    loop_weights,
    products_dtype,
    run_steps,
    weights_for_products,
    widest_memory,
)
from labml_nn.transformers.feedback.stack import Stack
from labml_nn.transformers.feedback.state import FeedbackState


class ParameterSnapshot:
    """A module's parameters as they are now: which objects, where in the module tree, and their contents."""

    def __init__(self, module: nn.Module):
        places: Dict[Tuple[int, str], Tuple[dict, str, object]] = {}
        for name, param in module.named_parameters():
            # The path to the parameter: each submodule in its parent's `_modules`, the parameter in its owner's
            # `_parameters` (the dictionaries that attribute access reads)
            *path, leaf = name.split('.')
            owner = module
            for part in path:
                child = owner._modules[part]
                places[id(owner), part] = (owner._modules, part, child)
                owner = child
            places[id(owner), leaf] = (owner._parameters, leaf, param)
        self.places = list(places.values())
        params = list(module.parameters())
        # Inference tensors have no version counter: their changes cannot be seen
        self.trackable = not any(p.is_inference() for p in params)
        self.contents = [(p, p._version, p.data_ptr()) for p in params] if self.trackable else []

    def unchanged(self) -> bool:
        """Whether the same parameter objects are at the same places, with the same contents."""
        return (self.trackable and all(d.get(name) is obj for d, name, obj in self.places)
                and all(p._version == version and p.data_ptr() == ptr for p, version, ptr in self.contents))


class _Kept(NamedTuple):
    """What inference derives from the parameters, with the product weights in `dtype`."""
    snapshot: ParameterSnapshot
    memory_norm: bool
    dtype: torch.dtype
    # Position terms for up to `size` memory slots
    size: int
    layers: List[LayerWeights]
    mem_w: torch.Tensor
    kv_w: torch.Tensor
    kv_b: Optional[torch.Tensor]


class InferenceCache:
    """The tensors inference derives from a transformer's parameters, kept while they are unchanged (see above)."""

    def __init__(self):
        self.kept: Optional[_Kept] = None

    def weights(self, model: FeedbackModel, n: int,
                dtype: torch.dtype) -> Tuple[List[LayerWeights], torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        r"""
        The steps' weights with position terms for `n` memory slots, $\mathrm{softmax}(w)$ and the key/value
        projection, the product weights in `dtype`: kept ones while the parameters are unchanged, else new ones.
        """
        kept = self.kept
        current = (kept is not None and kept.dtype == dtype and kept.memory_norm == model.memory_norm
                   and kept.snapshot.unchanged())
        if not current or kept.size < n:
            # Parameters changed: make them for `n` slots; only more slots needed: twice as many, so that a
            # generation of $T$ tokens makes them $O(\log T)$ times
            size = max(n, 2 * kept.size) if current else n
            snapshot = ParameterSnapshot(model)
            kv_w, kv_b = model.kv_projection()
            layers, kv_w, kv_b = weights_for_products(loop_weights(model, size), kv_w, kv_b, dtype)
            kept = _Kept(snapshot, model.memory_norm, dtype, size, layers, model.memory_weights(), kv_w, kv_b)
            self.kept = kept if snapshot.trackable else None
        # Distances $n \dots 1$ are the last `n` rows of the kept $N \dots 1$ (all of them for the compiled step, which
        # asks for as many as its buffer has slots)
        layers = kept.layers if n == kept.size else [lw._replace(pos_emb=lw.pos_emb[-n:], pos_bias=lw.pos_bias[-n:])
                                                     for lw in kept.layers]
        return layers, kept.mem_w, kept.kv_w, kept.kv_b

    def __getstate__(self) -> dict:
        # Copies of the model (`copy.deepcopy`, pickling) start empty: the kept tensors are not the model's state
        return {'kept': None}


class CachingModel(FeedbackModel, Protocol):
    """A Feedback Transformer with the `InferenceCache` it owns."""
    inference_cache: InferenceCache


# `run_steps`' arguments without dropout and records: the steps of a call, whatever runs them
StepsRunner = Callable[[LoopConfig, torch.Tensor, List[LayerWeights], torch.Tensor, torch.Tensor,
                        Optional[torch.Tensor], torch.Tensor, int], torch.Tensor]


def inference_forward(model: CachingModel, x_seq: torch.Tensor, state: Optional[FeedbackState],
                      return_state: bool, compiled_steps: Optional[StepsRunner] = None
                      ) -> Union[torch.Tensor, Tuple[torch.Tensor, FeedbackState]]:
    """
    `model(x_seq, state, return_state)` (a Feedback Transformer, [transformer.py](transformer.html)) without
    autograd and without dropout: the steps write their keys and values straight into the state's cache.
    `compiled_steps` runs the steps in place of `run_steps` when given: the compiled fixed-shape step
    ([static_step.py](static_step.html)), which reads position terms for every slot of the cache's buffer.
    """
    seq_len, batch_size, _ = x_seq.shape
    # The cache to write into: a new one, or the state's (a fork when it was continued already)
    if state is None:
        n_start, stack = 0, Stack(seq_len, memory_span=model.memory_span, dim=4)
    else:
        n_start, stack = state.n_steps, state.stack_for_continuation()
    # The last step's memory is only made when a later call will need it
    n_new = seq_len if return_state else seq_len - 1
    # The products' dtype: autocast's, or the parameters'
    dtype = products_dtype(x_seq, model.weights.dtype)
    low = dtype or model.weights.dtype
    cfg = loop_config(model, n_start, return_state, dropout=False, dtype=dtype)
    # Room for the new entries `[groups, 2, batch_size, heads, d_k]` in one buffer that also holds every entry they
    # attend to; slot 0 of `cache` is absolute step `first`, as in the fused loop's work buffer
    entry = x_seq.new_empty((model.groups, 2, batch_size, model.heads, model.d_k), dtype=low)
    cache, first = stack.reserve(n_new, entry)
    # The weights, with position terms for the most memory a step of this call sees (the compiled step: for every
    # slot of the buffer)
    n = cache.shape[4] if compiled_steps is not None else widest_memory(n_start, seq_len, model.memory_span)
    layers, mem_w, kv_w, kv_b = model.inference_cache.weights(model, n, low)
    last = (compiled_steps or run_steps)(cfg, x_seq, layers, mem_w, kv_w, kv_b, cache, first)
    # $\mathrm{LN}(x_t^L)$ of every step
    out = model.norm(last)
    if not return_state:
        return out
    # The steps wrote their entries; the stack now counts them and hands out the view the next step sees
    return out, FeedbackState(stack, n_start + seq_len, stack.extended(n_new))
