"""
---
title: Experiments
summary: The training infrastructure under the experiments - configs, data, the training loop, run control and
  checkpoints, the command line, data-parallel training and the paper's training accelerators.
contents: [nlp_autoregression.py, text_data.py, optimizer.py, run_control.py, checkpoint.py, accelerators.py, cli.py,
  distributed.py, labml_adapter.py,
  state_tracking_data.py]
---

# Experiments

The training loop of [the Feedback Transformer experiment](../transformers/feedback/experiment.html) and everything
around it, as labml configs: [character-level autoregressive training](nlp_autoregression.html) on
[text data](text_data.html) with an [optimizer and schedule](optimizer.html); [run control](run_control.html)
(non-finite steps, periodic and signal checkpoints) and [checkpoints](checkpoint.html); the paper's
[training accelerators](accelerators.html); the [command line](cli.html), [data-parallel training](distributed.html),
the one [adapter to labml's private API](labml_adapter.html); and the
[programs of the state-tracking task](state_tracking_data.html).
"""

# Importing the experiments loads the labml adapter first: it checks the installed labml and makes labml's notebook
# logger work with IPython 9, before labml creates that logger
from labml_nn.experiments import labml_adapter  # noqa: F401
