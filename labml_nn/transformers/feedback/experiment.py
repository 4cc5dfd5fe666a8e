"""
---
title: Train the Feedback Transformer on Tiny Shakespeare
summary: labml experiment comparing the Feedback Transformer, its key/value variant and a parallel transformer.
---

# Feedback Transformer experiment

Trains a character-level language model on Tiny Shakespeare with one of three models of the same size:

* `feedback_transformer`: every layer attends over the weighted-sum memory of earlier steps;
* `feedback_transformer_kv`: the same, with keys and values shared by all layers and cached;
* `transformer`: an ordinary causal transformer, all positions in parallel, for comparison.

```
python -m labml_nn.transformers.feedback.experiment model=feedback_transformer_kv \\
    d_model=128 heads=4 d_ff=256 n_layers=4 seq_len=64 batch_size=32 epochs=1
```

Any config is a `key=value` argument (`--help` lists them). The defaults are labml_nn's GPU-sized experiment:
$d_{model} = 512$, 8 heads, $d_{ff} = 2048$, 6 layers, sequences of 128 characters, batches of 64, Adam with
the Noam schedule ($\\eta = 1$, 2,000 warm-up steps).
"""

from typing import List, Optional

from labml import lab
from labml.configs import option
from labml.logger import Text

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.experiments.accelerators import AcceleratedConfigs
from labml_nn.experiments.cli import run_experiment
from labml_nn.experiments.labml_adapter import public_options
from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel
from labml_nn.transformers.feedback.build import ModelConfig, build_model
from labml_nn.transformers.feedback.init_from import check_source_checkpoint, copy_from_transformer

__all__ = ['AutoregressiveModel', 'Configs', 'main']


class Configs(AcceleratedConfigs):
    """
    The model's size on top of the training configs; `model` picks one of the three models. The paper's
    accelerators: `memory_span`, `carry_memory` and `seq_len_curriculum`
    ([accelerators.py](../../experiments/accelerators.html)) and `init_from` ([init_from.py](init_from.html)).
    """
    model: AutoregressiveModel
    d_model: int = ModelConfig.d_model
    heads: int = ModelConfig.heads
    d_ff: int = ModelConfig.d_ff
    n_layers: int = ModelConfig.n_layers
    dropout: float = ModelConfig.dropout
    # Feedback models attend to at most this many latest memory vectors, the parallel transformer to this many
    # positions before each query (and the query's own); 0: no limit
    memory_span: int = 0
    # Feedback models normalize each memory vector before projecting it to keys and values (the authors' pre-norm)
    memory_norm: bool = ModelConfig.memory_norm
    # Feedback models start their position biases with a preference for recent memory (ALiBi's slopes)
    recency_init: bool = ModelConfig.recency_init
    # A `model=transformer` run (UUID, run folder or checkpoint) whose weights start a feedback model
    init_from: str = ''

    seq_len: int = 128
    batch_size: int = 64
    epochs: int = 128
    inner_iterations: int = 25
    prompt: str = 'It is'
    prompt_separator: str = ''
    # Adam with the Noam schedule, as labml_nn's experiment
    _optimizer_defaults = {'optimizer': 'Noam', 'learning_rate': 1.0, 'warmup': 2000}

    def validate(self) -> None:
        super().validate()
        model = self.model_name()
        # Here 0 is no limit (the builder's `None`)
        if (not isinstance(self.memory_span, int) or isinstance(self.memory_span, bool)
                or self.memory_span < 0):
            raise ValueError(f"memory_span must be an int >= 1 (the latest memory vectors each step attends "
                             f"to), or 0 for no limit, got {self.memory_span!r}")
        # The model's sizes, by the builder's rules (the vocabulary is not known before the text is read)
        self.model_config(model, n_vocab=1).validate()
        if model == 'transformer':
            # (`memory_norm` and `recency_init` are on by default: only asking for them is an error)
            for key in ('memory_norm', 'recency_init', 'init_from'):
                if getattr(self, key) and (key in self._overrides
                                           or key not in ('memory_norm', 'recency_init')):
                    raise ValueError(f"{key} is an option of the feedback models, not of model=transformer")
        if self.carry_memory and self.memory_span == 0:
            raise ValueError("carry_memory=True needs a memory_span >= 1: the carried memory would otherwise "
                             "grow with every batch of the epoch")
        if self.init_from and not self.resume:
            # The source run must exist and be a parallel transformer; shapes are checked when copying
            check_source_checkpoint(self.source_checkpoint(), self.init_from)

    def model_name(self) -> str:
        return self._overrides.get('model') or public_options(self, 'model')[0]

    def source_checkpoint(self) -> dict:
        """The checkpoint `init_from` names, read once (validation checks it, `init()` copies from it)."""
        cached = self.__dict__.get('_init_from_source')
        if cached is None or cached[0] != self.init_from:
            path = ckpt.find_checkpoint(self.init_from, lab.get_experiments_path(), 'init_from')
            cached = self._init_from_source = (self.init_from, ckpt.load_checkpoint(path))
        return cached[1]

    def init(self) -> None:
        resuming = self._resume_payload is not None
        # The model is built (from the seed) here
        super().init()
        # A resumed run has its weights already; `init_from` only starts a new one
        if self.init_from and not resuming:
            self.copy_init_from()

    def copy_init_from(self) -> None:
        """Copy the pretrained transformer's weights into the model and say what was and was not copied."""
        source = check_source_checkpoint(self.source_checkpoint(), self.init_from)
        copied, left, unused = copy_from_transformer(source, self.model)
        # Not needed any more (it may hold a large optimizer state)
        self.__dict__.pop('_init_from_source', None)
        self.log([('init_from: ', Text.key), (f'copied {len(copied)} parameters', Text.value),
                  (f' from {self.init_from}', Text.subtle)])
        for name, origin in copied:
            self.log([('  copied ', Text.subtle), (name, Text.value)] +
                     ([(f' <- {origin}', Text.subtle)] if origin != name else []))
        for name in left:
            self.log([('  left at initialization ', Text.warning), (name, Text.value)])
        for name in unused:
            self.log([('  not used from the checkpoint ', Text.subtle), (name, Text.value)])

    def experiment_name(self) -> str:
        return self.model_name()

    def model_config(self, name: str, n_vocab: Optional[int] = None) -> ModelConfig:
        """The model `name` with this run's sizes ([build.py](build.html)), for the text's vocabulary."""
        return ModelConfig(name, n_vocab=n_vocab or self.n_tokens, d_model=self.d_model, heads=self.heads,
                           d_ff=self.d_ff, n_layers=self.n_layers, dropout=self.dropout,
                           memory_span=self.memory_span or None,
                           memory_norm=self.memory_norm, recency_init=self.recency_init)


def _build(c: Configs, name: str) -> AutoregressiveModel:
    return build_model(c.model_config(name), c.device)


@option(Configs.model, 'feedback_transformer')
def _feedback_transformer(c: Configs) -> AutoregressiveModel:
    """The Feedback Transformer: per-layer key/value projections of the weighted-sum memory."""
    return _build(c, 'feedback_transformer')


@option(Configs.model, 'feedback_transformer_kv')
def _feedback_transformer_kv(c: Configs) -> AutoregressiveModel:
    """The key/value variant: one key/value projection shared by the layers, cached once per step."""
    return _build(c, 'feedback_transformer_kv')


@option(Configs.model, 'transformer')
def _causal_transformer(c: Configs) -> AutoregressiveModel:
    """An ordinary causal transformer of the same size, all positions at once."""
    return _build(c, 'transformer')


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m labml_nn.transformers.feedback.experiment key=value ...`"""
    run_experiment(Configs, argv)


if __name__ == '__main__':
    main()
