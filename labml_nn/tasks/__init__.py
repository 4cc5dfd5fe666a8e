"""
---
title: Tasks
summary: What a model is trained on - the data, the loss and the accuracy - one page per task, behind the small
  interface the trainer uses.
contents: [text.py, programs.py, state_tracking.py]
---

# Tasks

A task is what a model is trained and judged on: its data, its loss and its accuracy. Batches are token ids
`[seq_len, batch_size]` (`data`) and what is predicted at each position (`target`, the same shape). The
[trainer](../experiments/trainer.html) knows a task only through a small interface:

| member | what it is |
|---|---|
| `train`, `valid` | batches: `len()`, and `iterate(epoch, start, end)` yielding `(idx, data, target)` |
| `n_tokens` | the vocabulary size (the model's input and output) |
| `loss(logits, target)` | a batch's mean loss, number of correct predictions and number of positions counted |
| `record()` | what a checkpoint keeps of the data (the vocabulary, the text's path and hash) |
| `sample(model, device, autocast)` | something to print while training (a prompt and its continuation), or `None` |
| `valid_in_parts` | whether a share of `valid` may be read alone, for the progress line |

* [The text task](text.html): next-character prediction on Tiny Shakespeare.
* [The state-tracking task](state_tracking.html): the paper's algorithmic task, on [generated programs](programs.html).

A new dataset goes here, as a module with its data and a task object; an experiment
([the Feedback Transformer's](../transformers/feedback/experiment.html)) makes it an option of its configs.
"""
