r"""
---
title: labml_nn, the Feedback Transformer annotated
summary: An annotated, tested and fast PyTorch implementation of the Feedback Transformer (Fan et al., 2020), written
  as a book, with the math beside the code, page by page.
contents: [transformers/, tasks/, experiments/, utils.py, guide.md, results.md]
---

# labml_nn: the Feedback Transformer, annotated

This library implements [Addressing Some Limitations of Transformers with Feedback Memory](https://arxiv.org/abs/2002.09402)
(Fan et al., 2020) in PyTorch, and is written to be read: every page puts the explanation and the math on the
left, beside the code it explains on the right.

A Feedback Transformer lets every layer of a step attend to a memory made from *all* layers of the earlier steps,
so the highest representations of the past feed the lowest layers of the present. The price is that the steps run
one after the other, in training too. The library makes that affordable and checks that it is right:

* **Exact and tested.** Both variants (per-layer and shared keys and values) are held to a naive reference
  implementation in float64, outputs and every gradient, and to `torch.autograd.gradcheck`.
* **Fast.** The training loop is one autograd function with a hand-written backward pass, 4 to 5 times faster
  than labml_nn's module loop on a CPU; generation runs one step per token from a cached state.
* **Usable.** Mixed precision (bf16, fp16), memory carried across training batches, a limited memory span, a
  sequence-length curriculum, initialization from a parallel transformer, checkpoints that survive crashes and
  signals, and data-parallel training, in a labml experiment.

## Where to start reading

1. [The Feedback Transformer](transformers/feedback/index.html): the idea and the pieces.
2. [The layers and the loop](transformers/feedback/transformer.html), the model as the paper writes it, and
   [the attention](transformers/feedback/attention.html) over the memory with relative positions.
3. [The cache](transformers/feedback/stack.html) and [the state](transformers/feedback/state.html): how each
   memory vector is projected once and a sequence continues across calls.
4. [The fused loop](transformers/feedback/fused.html) and
   [its backward pass](transformers/feedback/fused_backward.html): backpropagation through time by hand, every
   gradient beside its formula.
5. [The tasks](tasks/index.html): [next-character prediction](tasks/text.html) on Tiny Shakespeare and the paper's
   [state-tracking task](tasks/state_tracking.html).
6. [The experiment](transformers/feedback/experiment.html): training on Tiny Shakespeare, and
   [the trainer](experiments/trainer.html) under it, which owns the parts of a run.

Then: the [user guide](guide.html) has every option of the experiment (training, checkpoints, data-parallel runs,
mixed precision, sampling), and the [results](results.html) every measured figure (state tracking, training and
generation speed, quality on Tiny Shakespeare), each with the command that made it.
"""
