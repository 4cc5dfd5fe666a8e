"""
---
title: Experiments
summary: The training machinery under the experiments - the flat training configs, the trainer and the parts it
  owns (precision, run control, checkpoints, carried memory, curriculum), the optimizer, the command line,
  data-parallel training and the one adapter to labml's internals.
contents: [configs.py, trainer.py, optimizer.py, precision.py, run_control.py, checkpoint.py, carried_memory.py,
  curriculum.py, cli.py, distributed.py, labml_adapter.py]
---

# Experiments

What trains a model on a task, whichever model and task: the [training configs](configs.html), one flat set of
labml configs, build a [trainer](trainer.html), which owns the parts of a run and calls them from one training step:
the [optimizer and its schedule](optimizer.html), [mixed precision](precision.html), [run control](run_control.html)
(non-finite steps, periodic and signal checkpoints), [checkpoints](checkpoint.html),
[memory carried across batches](carried_memory.html) and a [sequence-length curriculum](curriculum.html). The
[command line](cli.html) runs an experiment, also under `torchrun` ([data-parallel training](distributed.html)),
and [one module](labml_adapter.html) holds every private labml API this uses.

Nothing here imports a model: an experiment ([the Feedback Transformer's](../transformers/feedback/experiment.html))
brings its model and its [task](../tasks/index.html) as options of its configs.
"""
