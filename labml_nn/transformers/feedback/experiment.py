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

from labml.configs import option

from labml_nn.experiments.cli import run_experiment
from labml_nn.experiments.nlp_autoregression import NLPAutoRegressionConfigs, check_int
from labml_nn.transformers.causal import CausalAttention, CausalTransformer, CausalTransformerLayer
from labml_nn.transformers.feedback import (
    FeedbackAttention,
    FeedbackTransformer,
    FeedbackTransformerKV,
    FeedbackTransformerLayer,
    FeedForward,
)
from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel

__all__ = ['AutoregressiveModel', 'Configs', 'main']


class Configs(NLPAutoRegressionConfigs):
    """
    The model's size on top of the training configs; `model` picks one of the three models.
    """
    model: AutoregressiveModel
    d_model: int = 512
    heads: int = 8
    d_ff: int = 2048
    n_layers: int = 6
    dropout: float = 0.0

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
        for key in ('d_model', 'heads', 'd_ff', 'n_layers'):
            check_int(key, getattr(self, key), 1)
        if self.d_model % self.heads != 0:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def experiment_name(self) -> str:
        return self._overrides.get('model') or self._to_json()['model']['options'][0]


def _feedback_layer(c: Configs, is_kv: bool) -> FeedbackTransformerLayer:
    return FeedbackTransformerLayer(d_model=c.d_model,
                                    attn=FeedbackAttention(c.heads, c.d_model, c.dropout, is_kv_precomputed=is_kv),
                                    feed_forward=FeedForward(c.d_model, c.d_ff, c.dropout),
                                    dropout_prob=c.dropout)


@option(Configs.model, 'feedback_transformer')
def _feedback_transformer(c: Configs) -> AutoregressiveModel:
    """The Feedback Transformer: per-layer key/value projections of the weighted-sum memory."""
    transformer = FeedbackTransformer(_feedback_layer(c, False), c.n_layers)
    return AutoregressiveModel(c.n_tokens, c.d_model, transformer).to(c.device)


@option(Configs.model, 'feedback_transformer_kv')
def _feedback_transformer_kv(c: Configs) -> AutoregressiveModel:
    """The key/value variant: one key/value projection shared by the layers, cached once per step."""
    transformer = FeedbackTransformerKV(_feedback_layer(c, True), c.n_layers, c.d_model, c.heads)
    return AutoregressiveModel(c.n_tokens, c.d_model, transformer).to(c.device)


@option(Configs.model, 'transformer')
def _causal_transformer(c: Configs) -> AutoregressiveModel:
    """An ordinary causal transformer of the same size, all positions at once."""
    layer = CausalTransformerLayer(d_model=c.d_model,
                                   attn=CausalAttention(c.heads, c.d_model, c.dropout),
                                   feed_forward=FeedForward(c.d_model, c.d_ff, c.dropout),
                                   dropout_prob=c.dropout)
    return AutoregressiveModel(c.n_tokens, c.d_model, CausalTransformer(layer, c.n_layers)).to(c.device)


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m labml_nn.transformers.feedback.experiment key=value ...`"""
    run_experiment(Configs, argv)


if __name__ == '__main__':
    main()
