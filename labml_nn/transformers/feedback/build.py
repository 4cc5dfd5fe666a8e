r"""
---
title: One way to build a model
summary: A small configuration dataclass and the one function that turns it into a Feedback Transformer (either
  variant) or the parallel baseline, used by the experiments, the benchmarks and the tests.
---

# Building a model

labml_nn's constructors are the low-level API: a layer is built from its attention and feed-forward modules, and
a transformer from a layer it copies $L$ times. Every script needs the same recipe around them, so it lives here
once. A `ModelConfig` names the model and its sizes; `build_model` makes the language model (embedding,
transformer, head) and `build_transformer` the transformer alone:

```python
from labml_nn.transformers.feedback.build import ModelConfig, build_model

config = ModelConfig('feedback_transformer_kv', n_vocab=65, d_model=128, heads=4, d_ff=256, n_layers=4)
model = build_model(config)            # AutoregressiveModel: token ids [seq_len, batch_size] -> logits
```

The three models are the experiment's:

| `model` | transformer |
|---|---|
| `feedback_transformer` | `FeedbackTransformer`: each layer projects the memory with its own keys and values |
| `feedback_transformer_kv` | `FeedbackTransformerKV`: one key/value projection shared by all layers |
| `transformer` | `CausalTransformer`: the parallel baseline ([causal.py](../causal.html)) |
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
from labml.configs import option
from torch import nn

from labml_nn.experiments.configs import TrainingConfigs
from labml_nn.experiments.labml_adapter import config_default, public_options
from labml_nn.transformers.causal import CausalAttention, CausalTransformer, CausalTransformerLayer
from labml_nn.transformers.feed_forward import FeedForward
from labml_nn.transformers.feedback.attention import FeedbackAttention
from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel
from labml_nn.transformers.feedback.compiled import check_compile, compile_mode
from labml_nn.transformers.feedback.transformer import (
    FeedbackTransformer,
    FeedbackTransformerKV,
    FeedbackTransformerLayer,
)
from labml_nn.utils import check_memory_span

# The experiments' `compile=` values, as `compile=` of the constructors takes them
COMPILE_KEYS = {'off': None, 'false': None, 'true': 'default', 'default': 'default',
                'reduce-overhead': 'reduce-overhead'}

# The model names, as the experiment's `model=` option spells them
MODELS = ('feedback_transformer', 'feedback_transformer_kv', 'transformer')


@dataclass
class ModelConfig:
    """
    * `model`: one of `MODELS`
    * `n_vocab`: vocabulary size (only `build_model` uses it)
    * `d_model`, `heads`: the width and the attention heads; `d_model` must be a multiple of `heads`
    * `memory_span`: feedback models attend to at most this many latest memory vectors, the parallel transformer to
      a window of this many positions (`None`: all)
    * `d_ff`, `n_layers`: the feed-forward network's hidden size, and the number of layers
    * `dropout`: on attention probabilities, residual branches and hidden units
    * `memory_norm`: feedback models normalize the memory before projecting it (the authors' pre-norm memory; on by
      default here, off by default in the constructors, which keep labml_nn's parameters)
    * `max_distance`: size of the relative position tables
    * `recency_init`: the models start their position biases with ALiBi's recency slopes (attention.py; on by
      default here)

    `memory_norm` and `recency_init` are what makes memory carried across batches train (the accelerators
    log measures it) and cost nothing otherwise; the parallel baseline ignores `memory_norm` and starts with the
    same recency slopes.
    * `fused`: feedback models train with the fused loop (`False`: autograd over the modules)
    * `compile`: feedback models run inference with their step compiled by `torch.compile` (`True`, `'default'`,
      `'reduce-overhead'`; [compiled.py](compiled.html)); `False`: eager
    """
    model: str = 'feedback_transformer'
    n_vocab: int = 65
    d_model: int = 512
    heads: int = 8
    memory_span: Optional[int] = None
    d_ff: int = 2048
    n_layers: int = 6
    dropout: float = 0.0
    memory_norm: bool = True
    max_distance: int = 128
    recency_init: bool = True
    fused: bool = True
    compile: Union[bool, str, None] = False

    @property
    def is_feedback(self) -> bool:
        return self.model != 'transformer'

    def validate(self) -> None:
        """A `ValueError` naming the first field out of range."""
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r} is not one of {', '.join(MODELS)}")
        for key in ('n_vocab', 'd_model', 'heads', 'd_ff', 'n_layers', 'max_distance'):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        if self.d_model % self.heads != 0:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_memory_span(self.memory_span)
        if compile_mode(self.compile) is not None and not self.is_feedback:
            raise ValueError("compile is an option of the feedback models, not of model=transformer")


def build_transformer(config: ModelConfig) -> nn.Module:
    """The transformer of `config`: `[seq_len, batch_size, d_model]` in and out, with the state API."""
    config.validate()
    c = config
    # The position-wise network, copied into every layer
    feed_forward = FeedForward(c.d_model, c.d_ff, c.dropout)
    if not c.is_feedback:
        # A local causal window of `memory_span` positions (`None`: unlimited), in every copy of the layer
        attn = CausalAttention(c.heads, c.d_model, c.dropout, max_distance=c.max_distance,
                               memory_span=c.memory_span, recency_init=c.recency_init)
        layer = CausalTransformerLayer(d_model=c.d_model, attn=attn, feed_forward=feed_forward,
                                       dropout_prob=c.dropout)
        return CausalTransformer(layer, c.n_layers)
    # The shared-KV variant's attention receives keys and values projected by the transformer
    is_kv = c.model == 'feedback_transformer_kv'
    attn = FeedbackAttention(c.heads, c.d_model, c.dropout, is_kv_precomputed=is_kv,
                             max_distance=c.max_distance, recency_init=c.recency_init)
    layer = FeedbackTransformerLayer(d_model=c.d_model, attn=attn, feed_forward=feed_forward,
                                     dropout_prob=c.dropout)
    options = dict(memory_span=c.memory_span, fused=c.fused, memory_norm=c.memory_norm, compile=c.compile)
    if is_kv:
        return FeedbackTransformerKV(layer, c.n_layers, c.d_model, c.heads, **options)
    return FeedbackTransformer(layer, c.n_layers, **options)


def build_model(config: ModelConfig, device: Optional[torch.device] = None) -> AutoregressiveModel:
    """The language model of `config`: embedding, `build_transformer(config)` and the head, on `device`."""
    model = AutoregressiveModel(config.n_vocab, config.d_model, build_transformer(config))
    return model if device is None else model.to(device)


# ## The model as labml configs
#
# The experiments ([text](experiment.html), [state tracking](state_tracking.html)) set a model with the same keys
# as `ModelConfig`'s fields, from the command line (`model=feedback_transformer_kv d_model=128 ...`). Their
# configs inherit these keys and the three `model` options from `ModelConfigs`; each experiment gives its own
# defaults.

class ModelConfigs(TrainingConfigs):
    """The training configs with a model: `model` is one of `MODELS`, built with the sizes below."""
    # (declared here: the options below are this class's)
    model: AutoregressiveModel
    d_ff: int = ModelConfig.d_ff
    heads: int = ModelConfig.heads
    n_layers: int = ModelConfig.n_layers
    dropout: float = ModelConfig.dropout
    # Feedback models attend to at most this many latest memory vectors, the parallel transformer to this many
    # positions before each query (and the query's own); 0: no limit
    memory_span: int = 0
    # Feedback models normalize each memory vector before projecting it to keys and values (the authors' pre-norm)
    memory_norm: bool = ModelConfig.memory_norm
    # The models start their position biases with a preference for recent positions (ALiBi's slopes)
    recency_init: bool = ModelConfig.recency_init
    # Feedback models run inference (validation, sampling) with their step compiled by `torch.compile`: `off`,
    # `default` (or `true`) or `reduce-overhead` (CUDA graphs)
    compile: str = 'off'

    def model_name(self) -> str:
        """The `model` option of this run (given, or the first option)."""
        return self._overrides.get('model') or public_options(self, 'model')[0]

    def model_config(self, name: Optional[str] = None, n_vocab: Optional[int] = None) -> ModelConfig:
        """The model `name` (default: this run's) with this run's sizes, for the task's vocabulary."""
        return ModelConfig(name or self.model_name(), n_vocab=n_vocab or self.n_tokens, d_model=self.d_model,
                           heads=self.heads, d_ff=self.d_ff, n_layers=self.n_layers, dropout=self.dropout,
                           # Here 0 is no limit (the builder's `None`)
                           memory_span=self.memory_span or None, memory_norm=self.memory_norm,
                           recency_init=self.recency_init, compile=COMPILE_KEYS.get(str(self.compile).lower(),
                                                                                    self.compile))

    def new_model(self, name: str) -> AutoregressiveModel:
        """The language model `name` with this run's sizes, on the run's device."""
        return build_model(self.model_config(name), self.device)

    def check_model(self) -> None:
        """The model's keys by the builder's rules (the vocabulary is not known before the data is read)."""
        if (not isinstance(self.memory_span, int) or isinstance(self.memory_span, bool)
                or self.memory_span < 0):
            raise ValueError(f"memory_span must be an int >= 1 (the latest memory vectors each step attends "
                             f"to), or 0 for no limit, got {self.memory_span!r}")
        if str(self.compile).lower() not in COMPILE_KEYS:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_KEYS)}, got {self.compile!r}")
        self.model_config(n_vocab=1).validate()
        # The compiler that `compile=` needs on this run's device, before the run starts
        check_compile(self.model_config(n_vocab=1).compile, 'cuda' if torch.cuda.is_available() else 'cpu')
        # (`memory_norm` is on by default: only asking for it is an error)
        if self.model_name() == 'transformer' and self.memory_norm and 'memory_norm' in self._overrides:
            raise ValueError("memory_norm is an option of the feedback models, not of model=transformer")
        if self.carry_memory and self.memory_span == 0:
            raise ValueError("carry_memory=True needs a memory_span >= 1: the carried memory would otherwise "
                             "grow with every batch of the epoch")


def model_config_of(config: Dict[str, Any], n_vocab: int) -> ModelConfig:
    """
    The model of a run's stored configuration (the `key=value` values it was given, over `ModelConfigs`' defaults),
    for a vocabulary of `n_vocab`: what a checkpoint of the text experiment needs to be rebuilt without its configs.
    """
    def value(key: str) -> Any:
        return config.get(key, config_default(ModelConfigs, key))

    return ModelConfig(config.get('model', MODELS[0]), n_vocab=n_vocab, d_model=value('d_model'),
                       heads=value('heads'), d_ff=value('d_ff'), n_layers=value('n_layers'), dropout=value('dropout'),
                       memory_span=value('memory_span') or None, memory_norm=value('memory_norm'),
                       recency_init=value('recency_init'))


@option(ModelConfigs.model, 'feedback_transformer')
def _feedback_transformer(c: ModelConfigs) -> AutoregressiveModel:
    """The Feedback Transformer: per-layer key/value projections of the weighted-sum memory."""
    return c.new_model('feedback_transformer')


@option(ModelConfigs.model, 'feedback_transformer_kv')
def _feedback_transformer_kv(c: ModelConfigs) -> AutoregressiveModel:
    """The key/value variant: one key/value projection shared by the layers, cached once per step."""
    return c.new_model('feedback_transformer_kv')


@option(ModelConfigs.model, 'transformer')
def _causal_transformer(c: ModelConfigs) -> AutoregressiveModel:
    """An ordinary causal transformer of the same size, all positions at once."""
    return c.new_model('transformer')
