r"""
---
title: Feedback Transformer
summary: An annotated, fast PyTorch implementation of the Feedback Transformer (Fan et al., 2020), with cached
  keys and values, a state API for continuing sequences, and a shared key/value variant.
contents: [readme.md, transformer.py, attention.py, stack.py, state.py, fused.py, fused_steps.py, fused_backward.py,
  fused_records.py, inference.py, static_step.py, compiled.py, autoregressive.py, build.py, generate.py,
  experiment.py, state_tracking.py, init_from.py]
---

# Feedback Transformer

This is a PyTorch implementation of the paper
[Addressing Some Limitations of Transformers with Feedback Memory](https://arxiv.org/abs/2002.09402)
(Fan, Lavril, Grave, Joulin and Sukhbaatar, 2020).

An ordinary (causal) transformer computes layer $l$ at step $t$ from layer $l-1$ at steps $\le t$. The
representation at the top of the stack at step $t-1$ is therefore never seen by the lower layers of step $t$:
the computation that can be carried from one step to the next is bounded by the depth of the network.

The Feedback Transformer lets every layer of step $t$ attend to a **memory** made from *all* layers of the
earlier steps,

$$m_t = \sum_{l=0}^{L} \mathrm{softmax}(w)_l\, x_t^l ,$$

where $x_t^0$ is the embedding of token $t$, $x_t^l$ the output of layer $l$ and $w$ a learned vector. The
highest-level representations of the past now feed the lowest layers of the present, which helps on tasks that
need state tracking (the paper shows it on algorithmic tasks and on reinforcement learning) and lets smaller,
shallower models match deeper ones on language modelling.

The price is parallelism: $m_t$ is needed by the first layer of step $t+1$, so the steps run one after the
other, in training too. This implementation keeps that loop as small as it can:

* each memory vector is projected to keys and values **once** and cached in a growing `Stack`, with a custom
  autograd function that hands out zero-copy views ([stack.py](stack.html));
* everything that does not depend on earlier steps (embedding, output head, loss, relative position terms)
  runs outside the loop.

## The pieces

* [attention.py](attention.html): `FeedbackAttention`, attention of one query over the memory with
  Transformer-XL style relative positions.
* [transformer.py](transformer.html): `FeedbackTransformerLayer`, and the loops `FeedbackTransformer`
  (weighted-sum memory, per-layer keys and values) and `FeedbackTransformerKV` (keys and values shared by all
  layers, the paper's cheaper variant): the module loop, as in labml_nn, and one call into each fast path.
* [stack.py](stack.html): `Stack` and `StackFunction`, the cache.
* [state.py](state.html): `FeedbackState`, to continue a sequence across calls (cached generation, memory
  carried across training batches), and the cache's layout.
* The same function, fast. Training: [fused.py](fused.html), the whole loop as one autograd function, whose
  forward runs the loop's steps on plain tensors ([fused_steps.py](fused_steps.html)) and whose backward pass is
  written by hand ([fused_backward.py](fused_backward.html)), both reading the named records of
  [fused_records.py](fused_records.html). Inference: [inference.py](inference.html), the same steps without
  autograd, straight into the state's cache; with `compile=True` one step over fixed shapes
  ([static_step.py](static_step.html)) built by `torch.compile` ([compiled.py](compiled.html)).
* [autoregressive.py](autoregressive.html): `AutoregressiveModel`, the language model around a transformer.
* [build.py](build.html): `ModelConfig` and `build_model`, the one recipe that assembles any of the models.
* [generate.py](generate.html): sampling text from a trained checkpoint.
* [experiment.py](experiment.html): training on Tiny Shakespeare, with the paper's accelerators
  ([init_from.py](init_from.html): starting from a trained parallel transformer).
* [state_tracking.py](state_tracking.html): the paper's algorithmic task, reading programs and saying the printed
  values, where the feedback memory beats a parallel transformer with the same attention span.

## Using it

A small model, a sequence through it in one call and in two, the second continuing the first from its state. In
evaluation mode (no dropout) the two give the same outputs; in training mode every call draws new dropout masks.

```python beside
import torch
from labml_nn.transformers.feedback import (FeedbackAttention, FeedbackTransformer, FeedbackTransformerLayer,
                                            FeedForward)

d_model, heads, d_ff, n_layers = 128, 4, 256, 4
layer = FeedbackTransformerLayer(d_model=d_model, attn=FeedbackAttention(heads, d_model),
                                 feed_forward=FeedForward(d_model, d_ff), dropout_prob=0.1)
transformer = FeedbackTransformer(layer, n_layers).eval()
x = torch.randn(64, 16, d_model)              # [seq_len, batch_size, d_model]
y = transformer(x)                            # [seq_len, batch_size, d_model]
# Continue a sequence: the same result as one call over the concatenation
y1, state = transformer(x[:40], return_state=True)
y2, state = transformer(x[40:], state=state, return_state=True)
assert torch.allclose(torch.cat([y1, y2]), y, atol=1e-5)
```
"""

from labml_nn.transformers.feed_forward import FeedForward
from labml_nn.transformers.feedback.attention import FeedbackAttention
from labml_nn.transformers.feedback.build import ModelConfig, build_model, build_transformer
from labml_nn.transformers.feedback.stack import Stack, StackFunction
from labml_nn.transformers.feedback.state import FeedbackState
from labml_nn.transformers.feedback.transformer import (
    FeedbackTransformer,
    FeedbackTransformerKV,
    FeedbackTransformerLayer,
)

__all__ = [
    "FeedForward",
    "FeedbackAttention",
    "FeedbackState",
    "FeedbackTransformer",
    "FeedbackTransformerKV",
    "FeedbackTransformerLayer",
    "ModelConfig",
    "Stack",
    "StackFunction",
    "build_model",
    "build_transformer",
]
