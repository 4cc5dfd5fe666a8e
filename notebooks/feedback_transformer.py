# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The Feedback Transformer on Tiny Shakespeare
#
# [Addressing Some Limitations of Transformers with Feedback Memory](https://arxiv.org/abs/2002.09402)
# (Fan et al., 2020) lets every layer of step $t$ attend to a *memory* of all earlier steps, where the memory of
# step $j$ is one vector made from **all** layers of that step:
#
# $$m_j = \sum_{l=0}^{L} \mathrm{softmax}(w)_l\, x_j^l,$$
#
# with $x_j^0$ the embedding, $x_j^l$ the output of layer $l$ and $w \in \mathbb{R}^{L+1}$ learned. Low layers of
# step $t$ thus see what high layers computed at earlier steps, at the price of running the steps one after the
# other.
#
# This notebook installs `labml_nn` (on Colab) and trains three models on Tiny Shakespeare with labml's experiment
# API:
#
# * `feedback_transformer_kv`: keys and values shared by all layers, so each memory vector is projected once;
# * `feedback_transformer`: every layer projects the memory with its own keys and values;
# * `transformer`: an ordinary causal transformer of the same size, all positions in parallel, for comparison;
#
# then plots their losses and the learned memory weights $\mathrm{softmax}(w)$, and samples text from each with
# cached generation.
#
# Environment variables: `NOTEBOOK_QUICK=1` makes every run tiny (the whole notebook in under 2 minutes on
# 2 CPU cores, as CI runs it); `TINY_SHAKESPEARE_PATH` points at a local copy of the text (else it is
# downloaded once into labml's `data/` folder); `NOTEBOOK_FIGURES` is a folder to save the plots into as PNG.

# %% [markdown]
# ## Install (Colab only)
#
# On Colab the library is installed from its repository (PyTorch is already there). Anywhere else this cell
# does nothing: install the library yourself, e.g. `pip install -e .` in a clone.

# %%
import subprocess
import sys

# The repository of this library
REPOSITORY_URL = 'https://github.com/labml-feedback/labml_nn'

if 'google.colab' in sys.modules:
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', f'git+{REPOSITORY_URL}'], check=True)

# %% [markdown]
# ## Imports

# %%
# ruff: noqa: E402 (in a notebook the imports come after the install cell)
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

# labml takes a Jupyter kernel whose environment lacks `_` (which shells set) for PyCharm's, whose output needs
# ipywidgets; kernels started by an IDE or headless may lack it
os.environ.setdefault('_', sys.executable)
from labml import experiment, lab

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.transformers.feedback.build import MODELS
from labml_nn.transformers.feedback.experiment import main as run_experiment
from labml_nn.transformers.feedback.generate import load_model

# %% [markdown]
# ## Configuration
#
# Every run gets the same `key=value` configs as `python -m labml_nn.transformers.feedback.experiment` takes
# (`run_experiment(['--help'])` lists them). The model size and the budget depend on where the notebook runs:
# a GPU, a CPU, or the quick run for CI. The runs stop after `train_steps` optimizer steps; the loss curves
# compare the models step for step on the same batches.

# %%
QUICK = os.environ.get('NOTEBOOK_QUICK', '') == '1'
FIGURES = Path(os.environ['NOTEBOOK_FIGURES']) if os.environ.get('NOTEBOOK_FIGURES') else None
ON_GPU = torch.cuda.is_available()

if QUICK:
    # A small model for 150 steps on one thread: a smoke run that still shows the losses fall
    SIZE = {'d_model': 64, 'heads': 4, 'd_ff': 128, 'n_layers': 3, 'seq_len': 32, 'batch_size': 16}
    BUDGET = {'train_steps': 150, 'optimizer.optimizer': 'Adam', 'optimizer.learning_rate': 3e-3,
              'sample_tokens': 20, 'num_threads': 1}
elif ON_GPU:
    # A GPU: a wider model on longer sequences
    SIZE = {'d_model': 256, 'heads': 8, 'd_ff': 1024, 'n_layers': 4, 'seq_len': 128, 'batch_size': 64}
    BUDGET = {'train_steps': 1000, 'optimizer.optimizer': 'Noam', 'optimizer.learning_rate': 1.0,
              'optimizer.warmup': 400, 'sample_tokens': 60}
else:
    # A CPU: the README's CPU recipe (`experiments/train_cpu.py`), cut to 300 steps
    SIZE = {'d_model': 128, 'heads': 4, 'd_ff': 256, 'n_layers': 4, 'seq_len': 64, 'batch_size': 32}
    BUDGET = {'train_steps': 300, 'optimizer.optimizer': 'Noam', 'optimizer.learning_rate': 1.0,
              'optimizer.warmup': 400, 'sample_tokens': 40, 'num_threads': 1}

# An epoch is split into `inner_iterations` parts, each followed by a validation on a share of the validation
# set. We want about `VALID_POINTS` of them within `train_steps`, so we count the training batches of an epoch:
# the first 90% of Tiny Shakespeare's 1,115,394 characters, cut into sequences of `seq_len + 1`.
VALID_POINTS = 10
TRAIN_CHARACTERS = 1_115_394 * 9 // 10
batches_per_epoch = (TRAIN_CHARACTERS - 1) // SIZE['seq_len'] // SIZE['batch_size']
inner_iterations = max(1, min(batches_per_epoch, batches_per_epoch * VALID_POINTS // BUDGET['train_steps']))
# `epochs` is an upper bound: `train_steps` ends every run first. The whole validation set is used at the end.
CONFIGS = {**SIZE, **BUDGET, 'inner_iterations': inner_iterations, 'epochs': 100, 'seed': 5}
print(f"{'quick run' if QUICK else 'GPU' if ON_GPU else 'CPU'}: "
      + ' '.join(f'{key}={value}' for key, value in CONFIGS.items()))

# %% [markdown]
# ## Training
#
# `run_experiment` is the experiment's command line as a function: it checks the configs, creates a labml
# experiment (a run folder under `logs/<model>/<run uuid>/`), trains with labml's monitor printing progress,
# losses and greedy samples, and writes a checkpoint with the loss history at the end. We keep each run's UUID
# to find its checkpoint.

# %%
RUNS = {}
WALL_SECONDS = {}
for model_name in MODELS:
    start = time.perf_counter()
    run_experiment([f'model={model_name}', *(f'{key}={value}' for key, value in CONFIGS.items())])
    WALL_SECONDS[model_name] = time.perf_counter() - start
    RUNS[model_name] = experiment.get_uuid()

# The checkpoint of every run: weights, optimizer, progress and the loss history
CHECKPOINTS = {name: ckpt.load_checkpoint(ckpt.find_checkpoint(uuid, lab.get_experiments_path()))
               for name, uuid in RUNS.items()}
for name, payload in CHECKPOINTS.items():
    final = payload['history']['evaluations'][-1]
    progress = payload['progress']
    print(f"{name:<25} {progress['step']:>5} steps  valid loss {final['valid_loss']:.3f}  "
          f"{progress['tokens'] / progress['train_seconds']:>8,.0f} training tokens/s  "
          f"{WALL_SECONDS[name]:6.1f} s in all")


# %% [markdown]
# ## Losses
#
# The training loss of every step (a moving average over a few steps) and the validation loss. During training
# each point is a different share of the validation set, so the points are noisy; a star is a validation on the
# whole set (at the end of the run, and of every epoch on longer runs), the figure to compare models by.

# %%
def moving_average(values, width):
    """Mean of each window of `width` consecutive values (the first `width - 1` values have no window)."""
    values = torch.tensor(values, dtype=torch.float64)
    width = max(1, min(width, len(values)))
    return torch.nn.functional.avg_pool1d(values[None, None], width, stride=1)[0, 0], width


def save_figure(fig, name):
    if FIGURES is not None:
        FIGURES.mkdir(parents=True, exist_ok=True)
        fig.savefig(FIGURES / name, dpi=110)


fig, (ax_train, ax_valid) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
for i, (name, payload) in enumerate(CHECKPOINTS.items()):
    history = payload['history']
    steps = [h['step'] for h in history['train']]
    smooth, width = moving_average([h['loss'] for h in history['train']], max(1, len(steps) // 20))
    line, = ax_train.plot(steps[width - 1:], smooth, label=name)
    color = line.get_color()
    ax_valid.plot([h['step'] for h in history['valid']], [h['loss'] for h in history['valid']], 'o--',
                  color=color, label=f'{name} (a share of the set)')
    evaluations = history['evaluations']
    # Smaller stars for later models, so that stars at the same place stay visible
    ax_valid.plot([h['step'] for h in evaluations], [h['valid_loss'] for h in evaluations], '*',
                  markersize=18 - 4 * i, color=color, label=f"{name} (whole set: {evaluations[-1]['valid_loss']:.3f})")
ax_train.set_title(f'Training loss (moving average over {width} steps)')
ax_valid.set_title('Validation loss')
for ax in (ax_train, ax_valid):
    ax.set_xlabel('optimizer step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
ax_train.set_ylabel('cross entropy (nats per character)')
fig.tight_layout()
save_figure(fig, 'losses.png')
plt.show()

# %% [markdown]
# ## Memory weights
#
# Each Feedback Transformer learns how much of the embedding ($l = 0$) and of every layer's output goes into the
# memory, $\mathrm{softmax}(w)_l$. They start equal, $1 / (L + 1)$ (the dotted line); where the training moves
# them shows which layers the model finds worth remembering. We rebuild each trained model from its
# checkpoint, as `python -m labml_nn.transformers.feedback.generate` does.

# %%
TRAINED = {name: load_model(uuid) for name, uuid in RUNS.items()}
feedback_names = [name for name in MODELS if name.startswith('feedback')]

fig, axes = plt.subplots(1, len(feedback_names), figsize=(5.5 * len(feedback_names), 4), sharey=True,
                         squeeze=False)
for ax, name in zip(axes[0], feedback_names):
    model, _ = TRAINED[name]
    weights = model.transformer.memory_weights().detach().cpu()
    labels = ['embedding'] + [f'layer {i}' for i in range(1, len(weights))]
    bars = ax.bar(labels, weights.numpy(), color='tab:blue')
    ax.bar_label(bars, fmt='%.3f', fontsize=8)
    ax.axhline(1 / len(weights), color='gray', linestyle=':', label='initial value')
    ax.set_title(f'{name}: softmax(w)')
    ax.set_ylabel('weight in the memory')
    ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, 'memory_weights.png')
plt.show()

# %% [markdown]
# ## Sampling
#
# `model.generate()` feeds the prompt once and then one character per step from the cached keys and values of the
# memory (the parallel baseline from its key/value cache), so the prefix is never run again. We sample at
# temperature 0.8 among the 10 most likely characters, from a seeded generator: the same text on every run.

# %%
PROMPT = 'It is'
N_TOKENS = 200 if QUICK else 500
for name, (model, text) in TRAINED.items():
    device = model.src_embed.weight.device
    # The prompt's character ids, `[prompt_len, batch_size = 1]`
    prompt = torch.tensor([text.stoi[c] for c in PROMPT], device=device)[:, None]
    rng = torch.Generator(device=device).manual_seed(1)
    start = time.perf_counter()
    # `[prompt_len + N_TOKENS, 1]`: the prompt followed by the sampled characters
    tokens = model.generate(prompt, N_TOKENS, temperature=0.8, top_k=10, rng=rng)
    seconds = time.perf_counter() - start
    sample = ''.join(text.itos[i] for i in tokens[:, 0].tolist())
    print(f'--- {name} ({N_TOKENS / seconds:,.0f} characters/s) ---')
    print(sample)
    print()
