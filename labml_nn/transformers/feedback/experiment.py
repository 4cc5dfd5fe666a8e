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

## The configs

`Configs` is the [training configs](../../experiments/configs.html) with the model's keys
([build.py](build.html)) and the text task's ([text.py](../../tasks/text.html)): the text and its character
vocabulary, the batches, and the prompt of the samples printed while training. labml_nn's own configuration of
this experiment (its keys and option names: `text='tiny_shakespeare'`, `tokenizer='character'`,
`train_loader='shuffled_train_loader'`, ...) runs unchanged.
"""

from typing import Any, Callable, List, Optional

from labml import lab
from labml.configs import option
from labml.logger import Text
from labml_helpers.datasets.text import TextDataset

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.experiments.cli import run_experiment
from labml_nn.tasks.text import (
    ContiguousStreams,
    SequenceBatches,
    TextTask,
    character_tokenizer,
    check_same_text,
    load_text,
    read_utf8,
    resolve_text_path,
)
from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel
from labml_nn.transformers.feedback.build import ModelConfigs
from labml_nn.transformers.feedback.init_from import check_source_checkpoint, copy_from_transformer
from labml_nn.utils import check_int

__all__ = ['AutoregressiveModel', 'Configs', 'main']


class Configs(ModelConfigs):
    """
    The three models on a text: the training configs, the model's keys and `model` options, and the text task's
    keys. `init_from` starts a feedback model from a trained parallel transformer ([init_from.py](init_from.html)).
    """
    # The task and its vocabulary size (declared here: the options below are this experiment's)
    task: TextTask
    n_tokens: int
    # The text: `text_path`, else `$TINY_SHAKESPEARE_PATH`, else labml's data folder (downloaded once)
    text_path: str = ''
    tokenizer: Callable = 'character'
    text: TextDataset
    # Resume on a text other than the checkpoint's (its vocabulary is kept)
    allow_text_change: bool = False
    train_loader: Any
    valid_loader: Any
    # Samples: `prompt`, greedy continuation of `sample_tokens` tokens joined by `prompt_separator`
    prompt: str = 'It is'
    prompt_separator: str = ''
    sample_tokens: int = 50
    # A `model=transformer` run (UUID, run folder or checkpoint) whose weights start a feedback model
    init_from: str = ''

    # labml_nn's experiment: sequences of 128, batches of 64, 128 epochs of 25 parts, Adam with the Noam schedule
    _defaults = {'seq_len': 128, 'batch_size': 64, 'epochs': 128, 'inner_iterations': 25,
                 'optimizer.optimizer': 'Noam', 'optimizer.learning_rate': 1.0, 'optimizer.warmup': 2000}

    def validate(self) -> None:
        """The training values, the model's, and the text task's."""
        super().validate()
        self.check_model()
        check_int('sample_tokens', self.sample_tokens, 0)
        if self.model_name() == 'transformer' and self.init_from:
            raise ValueError("init_from is an option of the feedback models, not of model=transformer")
        if self.init_from and not self.resume:
            # The source run must exist and be a parallel transformer; shapes are checked when copying
            check_source_checkpoint(self.source_checkpoint(), self.init_from)

    def check_data(self) -> None:
        """Build the text and its batches (not the model) and check what depends on them."""
        for name, part in (('train_loader', 'training text (its first 90%)'),
                           ('valid_loader', 'validation text (its last 10%)')):
            try:
                getattr(self, name)
            except ValueError as e:
                raise ValueError(f"text_path={self.text.path}: the {part} is too short: {e}") from None
        super().check_data()
        if self.sample_tokens > 0 and len(self.text.text_to_i(self.prompt)) == 0:
            raise ValueError(f"prompt={self.prompt!r} has no characters of the text's vocabulary "
                             f"to start a sample")

    def experiment_name(self) -> str:
        return self.model_name()

    def source_checkpoint(self) -> dict:
        """The checkpoint `init_from` names, read once (validation checks it, the model option copies from it)."""
        cached = self.__dict__.get('_init_from_source')
        if cached is None or cached[0] != self.init_from:
            path = ckpt.find_checkpoint(self.init_from, lab.get_experiments_path(), 'init_from')
            cached = self._init_from_source = (self.init_from, ckpt.load_checkpoint(path))
        return cached[1]

    def copy_init_from(self, model: AutoregressiveModel) -> None:
        """Copy the pretrained transformer's weights into `model` and say what was and was not copied."""
        source = check_source_checkpoint(self.source_checkpoint(), self.init_from)
        copied, left, unused = copy_from_transformer(source, model)
        # Not needed any more (it may hold a large optimizer state)
        self.__dict__.pop('_init_from_source', None)
        log = logger_of(self)
        log([('init_from: ', Text.key), (f'copied {len(copied)} parameters', Text.value),
             (f' from {self.init_from}', Text.subtle)])
        for name, origin in copied:
            log([('  copied ', Text.subtle), (name, Text.value)] +
                ([(f' <- {origin}', Text.subtle)] if origin != name else []))
        for name in left:
            log([('  left at initialization ', Text.warning), (name, Text.value)])
        for name in unused:
            log([('  not used from the checkpoint ', Text.subtle), (name, Text.value)])

    def new_model(self, name: str) -> AutoregressiveModel:
        """The model `name`, copied from `init_from` when a new run starts from a trained transformer."""
        model = super().new_model(name)
        # `init_from` only starts a new run: a resumed one has its weights already
        if self.init_from and self._resume_payload is None:
            self.copy_init_from(model)
        return model

    def make_loader(self, text: str, is_train: bool) -> Any:
        """
        The batches of the training (`is_train`) or validation text: contiguous streams with `carry_memory`, else
        shuffled sequences (with random offsets for training); this rank's rows of every batch.
        """
        ids, d = self.text.text_to_i(text), self._dist
        if self.carry_memory:
            return ContiguousStreams(ids, seq_len=self.seq_len, batch_size=self.batch_size, rank=d.rank,
                                     world_size=d.world_size)
        return SequenceBatches(ids, seq_len=self.seq_len, batch_size=self.batch_size, shuffle=True,
                               random_offset=is_train, seed=self.seed if is_train else self.seed + 1,
                               rank=d.rank, world_size=d.world_size)


def logger_of(c: Configs):
    """labml's logger on the main rank, nothing on the others."""
    from labml import logger
    return logger.log if c._dist.is_main else (lambda *args: None)


# Option names as labml_nn's, so its configuration dictionaries run unchanged

@option(Configs.tokenizer, 'character')
def _character_tokenizer(c: Configs) -> Callable:
    return character_tokenizer


@option(Configs.text, 'tiny_shakespeare')
def _text(c: Configs) -> TextDataset:
    """The text file (Tiny Shakespeare unless `text_path` says otherwise), with a resumed checkpoint's vocabulary."""
    path = resolve_text_path(c.text_path, lab.get_data_path())
    text, sha256 = read_utf8(path)
    # Resuming: the same text as the checkpoint's (unless `allow_text_change`), read with its vocabulary
    data = (c._resume_payload or {}).get('data') or {}
    check_same_text(data, path, sha256, c.resume, c.allow_text_change)
    return load_text(path, c.tokenizer, itos=data.get('itos'), read=(text, sha256))


@option(Configs.n_tokens)
def _n_tokens(c: Configs) -> int:
    return c.text.n_tokens


@option(Configs.train_loader, 'shuffled_train_loader')
def _train_loader(c: Configs) -> Any:
    return c.make_loader(c.text.train, True)


@option(Configs.valid_loader, 'shuffled_valid_loader')
def _valid_loader(c: Configs) -> Any:
    return c.make_loader(c.text.valid, False)


@option(Configs.task)
def _text_task(c: Configs) -> TextTask:
    return TextTask(c.text, c.train_loader, c.valid_loader, prompt=c.prompt, prompt_separator=c.prompt_separator,
                    sample_tokens=c.sample_tokens)


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m labml_nn.transformers.feedback.experiment key=value ...`"""
    run_experiment(Configs, argv)


if __name__ == '__main__':
    main()
