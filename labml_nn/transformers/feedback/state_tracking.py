r"""
---
title: The algorithmic state-tracking task
summary: Train the Feedback Transformers and a windowed parallel transformer to read long programs and say the value
  of every printed variable; held-out test accuracy on print positions.
---

# State tracking: what the feedback memory buys

The paper's algorithmic task (section 4.1.2; programs from
[`state_tracking_data.py`](../../experiments/state_tracking_data.html)): read a program one word at a time and, at
the `;` of every `print x ;`, predict the value of `x`. Loss and accuracy count only those positions.

```
python -m labml_nn.transformers.feedback.state_tracking \
    model=feedback_transformer_kv
python -m labml_nn.transformers.feedback.state_tracking \
    model=transformer n_layers=4
python -m labml_nn.transformers.feedback.state_tracking \
    variables=3 train_statements=100
```

The defaults are the CPU setting of the README: one variable, training programs of 20 statements, validation and
test programs of 100 statements (the paper's length), `memory_span=8`, $d_{model} = 64$, 2 layers.

As in the authors' setup, programs are read as long streams (one per batch row, programs one after the other)
cut into segments of `seq_len` tokens, and both kinds of model carry their state from one segment to the next
(`carry_memory=True`, the state detached between segments), with the same `memory_span` $S$:

* a **Feedback Transformer** at step $t$ attends to the memory vectors $m_{t-S} \dots m_{t-1}$; each of them was
  made from the memory before it, so the recurrence can keep a value for as long as it is needed;
* the **parallel transformer** (`model=transformer`, `CausalTransformer(memory_span=S)`) at position $t$ and layer
  $l$ attends to layer $l-1$ at positions $t-S \dots t$, through its key/value cache across segments; with $L$
  layers nothing older than $t - LS$ can reach position $t$. Given programs much longer than $LS$ it cannot see
  the assignment of a variable printed late in the program; the paper gives it twice the feedback model's layers.

## Epochs, curriculum and evaluation

Training programs are drawn fresh for every epoch and stream, never equal to a validation or test program. An
epoch is `epoch_segments` segments of every stream, and at its end the model is evaluated on the whole validation
set (the accuracy curve); after the last epoch, on the test programs. The memory starts empty at every epoch and
at every evaluation; held-out streams are made of whole programs, so every program is read from its start.

Training programs have `statements` statements unless `train_statements` says otherwise: `train_statements=20`
trains on programs of 20 statements throughout (validation and test always use `statements`), and stages,
`train_statements="10:0,40:0.5"`, make a curriculum: 10 statements in the first half of the epochs, 40 from
half-way. Short programs fit in a segment or two, so the gradient reaches from a print back to the statements that
made its value.
"""

from functools import lru_cache
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from labml.configs import option
from labml.logger import Text

from labml_nn.experiments.labml_adapter import base_defaults_kept
from labml_nn.experiments.nlp_autoregression import check_int
from labml_nn.experiments.state_tracking_data import (
    LabeledStreams,
    ProgramSpec,
    ProgramSplits,
    held_out_streams,
    training_streams,
    vocabulary,
)
from labml_nn.transformers.feedback.experiment import Configs

# The id of the label word `_` (first in the vocabulary): positions with it are not counted
NO_LABEL_ID = 0


def masked_loss(logits: torch.Tensor,
                labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Cross entropy over the positions whose label is not `_` (the prints), and how many of them the argmax gets
    right. `logits`: `[seq_len, batch_size, n_tokens]`, `labels`: `[seq_len, batch_size]`. Returns the mean loss
    (0 when there is no print), the number correct and the number of prints.
    """
    counted = labels != NO_LABEL_ID
    count = counted.sum()
    loss = F.cross_entropy(logits[counted], labels[counted], reduction='sum') / count.clamp(min=1)
    correct = (logits.detach().argmax(dim=-1) == labels)[counted].sum()
    return loss, correct, count


def parse_train_statements(spec: str) -> List[Tuple[int, float]]:
    """
    `train_statements` as stages `(statements, fraction of the epochs where the stage starts)`: `"20"` to
    `[(20, 0.0)]`, `"10:0,40:0.5"` to `[(10, 0.0), (40, 0.5)]`.
    """
    try:
        parts = [part.strip().partition(':') for part in spec.split(',')]
        stages = [(int(n), float(start) if sep else 0.0) for n, sep, start in parts]
    except ValueError:
        stages = []
    starts = [start for _, start in stages]
    if not stages or starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= 1 or \
            min(n for n, _ in stages) < 1:
        raise ValueError(f"train_statements={spec!r}: give statements per training program (e.g. 20), "
                         f"or stages statements:start_fraction with fractions increasing from 0 below 1 "
                         f"(e.g. 10:0,40:0.5)")
    return stages


class WordVocabulary:
    """The task's words as a labml `text`: ids of a space-separated string, and the word of each id."""

    def __init__(self, words: List[str]):
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}
        self.n_tokens = len(words)

    def text_to_i(self, text: str) -> torch.Tensor:
        return torch.tensor([self.stoi[w] for w in text.split() if w in self.stoi], dtype=torch.long)


class EpochStreams:
    """
    Training batches: for every epoch, fresh streams of programs from `make(epoch)` (a `LabeledStreams`), made when
    the epoch is first asked for. Every epoch has `n_segments` batches.
    """

    def __init__(self, make: Callable[[int], LabeledStreams], n_segments: int):
        self.make = lru_cache(maxsize=1)(make)
        self.n_segments = n_segments

    def __len__(self) -> int:
        return self.n_segments

    def batch(self, epoch: int, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.make(epoch).batch(epoch, idx)

    def iterate(self, epoch: int, start: int, end: int) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        return self.make(epoch).iterate(epoch, start, end)


class StateTrackingConfigs(Configs):
    """
    The feedback experiment's models and training loop on the state-tracking task. Keys of its own: the programs
    (`variables`, `statements`, `min_value`, `max_value`, `train_statements`), the splits (`valid_programs`,
    `test_programs`) and the epoch length (`epoch_segments`).
    """
    # The task; the defaults are the CPU preset of `experiments/state_tracking.py`
    variables: int = 1
    statements: int = 100
    min_value: int = 1
    max_value: int = 10
    train_statements: str = '20'
    valid_programs: int = 96
    test_programs: int = 500
    epoch_segments: int = 200
    # Evaluate on the test programs after the last epoch (`false` for runs that choose settings on validation)
    evaluate_test: bool = True
    splits: ProgramSplits
    test_loader: LabeledStreams
    # Declared again so that the options below belong to this class (labml registers an option with the class
    # that declares the config) and leave the text experiment's alone
    text: WordVocabulary = 'program_words'
    train_loader: EpochStreams = 'program_train_loader'
    valid_loader: LabeledStreams = 'program_valid_loader'

    d_model: int = 64
    heads: int = 4
    d_ff: int = 256
    n_layers: int = 2
    memory_span: int = 8
    carry_memory: bool = True
    seq_len: int = 64
    batch_size: int = 32
    epochs: int = 16
    inner_iterations: int = 1
    sample_tokens: int = 0
    prompt: str = ''
    # Adam, warmed up over 100 steps to $3 \cdot 10^{-3}$, then a cosine decay to 0 at the last step
    _optimizer_defaults = {'optimizer': 'AdamCosine', 'learning_rate': 3e-3, 'warmup': 100}

    def __init__(self):
        # labml (0.5.3) writes a subclass's defaults into the config items of its base classes while it collects
        # them: without this, making these configs would change the text experiment's defaults in this process
        with base_defaults_kept(type(self)):
            super().__init__()

    def validate(self) -> None:
        super().validate()
        self.spec()
        for key in ('valid_programs', 'test_programs'):
            check_int(key, getattr(self, key), self.batch_size)
        check_int('epoch_segments', self.epoch_segments, 1)
        if self.sample_tokens != 0:
            raise ValueError("sample_tokens must be 0: the models predict labels, not the next word")
        if self.train_statements:
            parse_train_statements(self.train_statements)

    def check_data(self) -> None:
        """The programs are generated: nothing to find or download."""

    def experiment_name(self) -> str:
        return f'state_tracking_{self.model_name()}'

    def spec(self, statements: Optional[int] = None) -> ProgramSpec:
        """The programs of validation and test, or of a curriculum stage with `statements`."""
        return ProgramSpec(self.variables, statements or self.statements, self.min_value, self.max_value)

    def statements_at(self, epoch: int) -> int:
        """Statements per training program in `epoch` (the curriculum's stage, else `statements`)."""
        n = self.statements
        for stage, start in parse_train_statements(self.train_statements) if self.train_statements else []:
            if epoch >= start * self.epochs:
                n = stage
        return n

    # ## Loss and accuracy on print positions only

    def forward_loss(self, data: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        loss, correct, _ = masked_loss(self.model_output(data), target)
        return loss, correct

    def count_targets(self, target: torch.Tensor) -> int:
        return int((target != NO_LABEL_ID).sum())

    # ## The loop: the whole validation set after every epoch, the test set at the end

    def valid_part(self, start: int, end: int) -> None:
        """No share of the validation set within an epoch: its streams are only read whole (at each epoch's end)."""

    def run(self) -> None:
        super().run()
        if self.evaluate_test:
            self.test()

    def test(self) -> None:
        """Evaluate on the test programs; the result goes into the history and the checkpoint."""
        loss, accuracy = self.evaluate(0, len(self.test_loader), self.test_loader)
        p = self._progress
        self._history['test'] = {'step': p['step'], 'loss': loss, 'accuracy': accuracy,
                                 'programs': self.test_programs}
        self.log([('Test: ', Text.key), ('loss ', Text.subtle), (f'{loss:.4f}', Text.value),
                  (', accuracy on prints ', Text.subtle), (f'{accuracy:.4f}', Text.value)])
        self.save_checkpoint()

    def local_rows(self) -> range:
        """The streams (batch rows) of this process."""
        local = self.batch_size // self._dist.world_size
        return range(self._dist.rank * local, (self._dist.rank + 1) * local)

    def held_out(self, programs: List[Any]) -> LabeledStreams:
        streams = held_out_streams(programs, self.text.itos, self.batch_size, self.seq_len)
        rows = self.local_rows()
        return LabeledStreams(streams.streams[rows.start:rows.stop], streams.labels[rows.start:rows.stop],
                              self.seq_len)


@option(StateTrackingConfigs.splits)
def _splits(c: StateTrackingConfigs) -> ProgramSplits:
    return ProgramSplits(c.spec(), c.seed, c.valid_programs, c.test_programs)


@option(StateTrackingConfigs.text, 'program_words')
def _program_words(c: StateTrackingConfigs) -> WordVocabulary:
    # The vocabulary is fixed by the grammar
    return WordVocabulary(vocabulary(c.spec()))


@option(StateTrackingConfigs.train_loader, 'program_train_loader')
def _train_loader(c: StateTrackingConfigs) -> EpochStreams:
    def make(epoch: int) -> LabeledStreams:
        return training_streams(c.splits, c.spec(c.statements_at(epoch)), c.text.itos, epoch, c.local_rows(),
                                c.epoch_segments, c.seq_len)
    return EpochStreams(make, c.epoch_segments)


@option(StateTrackingConfigs.valid_loader, 'program_valid_loader')
def _valid_loader(c: StateTrackingConfigs) -> LabeledStreams:
    return c.held_out(c.splits.valid)


@option(StateTrackingConfigs.test_loader)
def _test_loader(c: StateTrackingConfigs) -> LabeledStreams:
    return c.held_out(c.splits.test)


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m labml_nn.transformers.feedback.state_tracking key=value ...`"""
    from labml_nn.experiments.cli import run_experiment
    run_experiment(StateTrackingConfigs, argv)


if __name__ == '__main__':
    main()
