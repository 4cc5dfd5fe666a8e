"""
---
title: Experiments
summary: The training infrastructure under the experiments - configs, data, the training loop, checkpoints, the
  command line, data-parallel training and the paper's training accelerators.
contents: [nlp_autoregression.py, text_data.py, optimizer.py, accelerators.py, checkpoint.py, cli.py, distributed.py,
  state_tracking_data.py]
---

# Experiments

The training loop of [the Feedback Transformer experiment](../transformers/feedback/experiment.html) and everything
around it, as labml configs: [character-level autoregressive training](nlp_autoregression.html) on
[text data](text_data.html) with an [optimizer and schedule](optimizer.html), the paper's
[training accelerators](accelerators.html), [checkpoints](checkpoint.html), the [command line](cli.html) and
[data-parallel training](distributed.html); and the [programs of the state-tracking task](state_tracking_data.html).
"""
