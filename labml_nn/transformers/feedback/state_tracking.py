r"""
---
title: The algorithmic state-tracking task
summary: Train the Feedback Transformers and parallel transformers (a local window, and one that sees every program
  whole) to read long programs and say the value of every printed variable; test accuracy on the prints.
---

# State tracking: what the feedback memory buys

The paper's algorithmic task (section 4.1.2; [the task](../../tasks/state_tracking.html), on
[generated programs](../../tasks/programs.html)): read a program one word at a time and, at the `;` of every
`print x ;`, predict the value of `x`. Loss and accuracy count only those positions.

```
python -m labml_nn.transformers.feedback.state_tracking \
    model=feedback_transformer_kv
python -m labml_nn.transformers.feedback.state_tracking \
    model=transformer n_layers=4 memory_span=512
python -m labml_nn.transformers.feedback.state_tracking \
    variables=3 train_statements=100
```

The defaults are the CPU setting (`--preset cpu`): one variable, training programs of 20 statements, validation and
test programs of 100 statements (the paper's length), `memory_span=8`, $d_{model} = 64$, 2 layers.
`experiments/state_tracking.py` runs the comparison: its settings search (on validation only), seeds, and the
test's breakdown.

## What each model can see

As in the authors' setup, programs are read as long streams (one per batch row, programs one after the other)
cut into segments of `seq_len` words, and every model carries its state from one segment to the next
(`carry_memory=True`, the state detached between segments):

* a **Feedback Transformer** with `memory_span` $S$ attends at step $t$ to the memory vectors
  $m_{t-S} \dots m_{t-1}$; each of them was made from the memory before it, so the recurrence can keep a value
  for as long as it is needed: step $t$ can depend on **every** earlier word;
* the **parallel transformer** (`model=transformer`, [`CausalTransformer`](../causal.html)) with a window of $S$
  attends at position $t$ and layer $l$ to layer $l-1$ at positions $t-S \dots t$, through its key/value cache
  across segments. With $L$ layers it can reach $LS$ words back and nothing older. The comparison has two of them,
  with twice the feedback models' layers: a **local window** ($S = 8$, 4 layers: the last 32 words) and a
  **full view** ($S = 512$: every layer sees every word of every test program, the longest of which has 447
  words). The first cannot see the assignment of a variable printed late in a program; the second sees it, and has
  to compute the value from what it sees.

## Epochs, curriculum and evaluation

Training programs are drawn fresh for every epoch and stream (or from a fixed pool, `train_programs`), never equal
to a validation or test program. An epoch is `epoch_segments` segments of every stream, and at its end the model is
evaluated on the whole validation set (the accuracy curve); after the last epoch, once, on the test programs
(`evaluate_test=false` leaves the test out, for runs that choose settings). The memory starts empty at every epoch
and at every evaluation. The validation and test programs are named by `data_seed`, so every seed of a model is
tested on the same programs.

Training programs have `statements` statements unless `train_statements` says otherwise: `train_statements=20`
trains on programs of 20 statements throughout (validation and test always use `statements`), and stages,
`train_statements="10:0,40:0.5"`, make a curriculum: 10 statements in the first half of the epochs, 40 from
half-way. Short programs fit in a segment or two, so the gradient reaches from a print back to the statements that
made its value.

## The authors' setup

`experiments/state_tracking.py --preset paper` is the authors' `algorithmic_3var.sh` (facebookresearch/
transformer-sequential) in every respect that changes what is learned: 3 variables, programs of 100 statements for
training and test, a fixed set of 10,000 training programs reused every epoch (`train_programs=10000`), 1,000
validation and 1,000 test programs whose rows are cut from their concatenation (`held_out_layout=cut`, as their
`batchify`), $d_{model} = 256$, 4 heads, $d_{ff} = 1024$, dropout 0.2, segments of 64 words with carried memory,
an attention span of 100, Adam at $10^{-4}$ with 1,000 warm-up steps, gradient clipping 0.1, pre-norm layers,
50 epochs of 1,000 batches of 512 streams, 4 feedback layers and 8 transformer layers (the transformer reaches 800
words back: every test program). Where it differs, and why:

* the authors' training rows are one fixed concatenation of the 10,000 programs, read on with a random offset when
  a row ends; here every epoch draws each row's programs from the pool at random. The pool, and so what can be
  memorized, is the same;
* their transformer's query does not attend to its own position; ours does (as any causal transformer), so its
  window holds the query and the 100 words before it;
* their accuracy is the mean of each batch's error rate, ours the fraction of all prints; the two differ only by
  the weighting of batches with more or fewer prints;
* their validation during training reads a tenth of the validation batches; ours reads all of them (the test is
  read whole in both).

The preset needs a GPU: its run is 50,000 steps of 32,768 words each.

## Results on a CPU

One variable, `experiments/state_tracking.py --preset cpu` (the [results page](../../results.html) has the
breakdowns by distance and by statement, and the command, date, commit and machine of each run):

<!-- results:state_tracking -->
| model | sees without recurrence | trained on | test accuracy, mean (min-max) |
|---|---|---|---|
| `feedback_transformer_kv` | all earlier words (recurrence) | 20 statements | **0.968** (0.913-1.000, 3 seeds) |
| `feedback_transformer` | all earlier words (recurrence) | 20 statements | **0.998** |
| `transformer_window` | the last 32 words | 20 statements | **0.349** |
| `transformer_full` | 2048 words: whole programs | 20 statements | **0.383** |
| `transformer_full_train100` | 2048 words: whole programs | 100 statements | **0.461** |
<!-- /results:state_tracking -->

<!-- results:state_tracking_figure -->
![Validation accuracy against training steps, every run](../../../experiments/results/state_tracking_cpu.png)
<!-- /results:state_tracking_figure -->
"""

from typing import List, Optional

from labml.configs import option
from labml.logger import Text

from labml_nn.experiments.cli import run_experiment
from labml_nn.tasks.programs import ProgramSpec, ProgramSplits, vocabulary
from labml_nn.tasks.state_tracking import (
    LAYOUTS,
    Breakdown,
    EpochStreams,
    LabeledStreams,
    StateTrackingTask,
    held_out_streams,
    parse_train_statements,
    training_streams,
)
from labml_nn.transformers.feedback.build import ModelConfigs
from labml_nn.utils import check_int


class StateTrackingConfigs(ModelConfigs):
    """
    The training configs and the model's keys, on the state-tracking task. Its keys: the programs (`variables`,
    `statements`, `min_value`, `max_value`, `train_statements`, `train_programs`), the held-out splits
    (`valid_programs`, `test_programs`, `data_seed`, `held_out_layout`), the epoch length (`epoch_segments`) and
    whether to test at the end (`evaluate_test`).
    """
    # The task and its vocabulary size (declared here: the options below are this experiment's)
    task: StateTrackingTask
    n_tokens: int
    # The programs; the defaults are the CPU preset of `experiments/state_tracking.py`
    variables: int = 1
    statements: int = 100
    min_value: int = 1
    max_value: int = 10
    # Statements per training program, or curriculum stages `statements:start_fraction,...`
    train_statements: str = '20'
    # Training programs: fresh ones every epoch (0), or a fixed pool of this many reused every epoch
    train_programs: int = 0
    # The held-out splits: their sizes, the seed that names them (the same test for every training seed), and how
    # their streams are laid out (`whole` programs per stream, or `cut` from their concatenation as the authors')
    valid_programs: int = 96
    test_programs: int = 500
    data_seed: int = 5
    held_out_layout: str = 'whole'
    # Batches per epoch
    epoch_segments: int = 200
    # Evaluate on the test programs after the last epoch (`false` for runs that choose settings on validation)
    evaluate_test: bool = True
    splits: ProgramSplits

    # One variable, training programs of 20 statements, held-out programs of 100; span 8, $d_{model} = 64$,
    # 2 layers, carried memory; Adam warmed up over 100 steps to $3 \cdot 10^{-3}$, then a cosine decay to 0
    _defaults = {'d_model': 64, 'heads': 4, 'd_ff': 256, 'n_layers': 2, 'memory_span': 8, 'carry_memory': True,
                 'seq_len': 64, 'batch_size': 32, 'epochs': 16, 'inner_iterations': 1,
                 'optimizer.optimizer': 'AdamCosine', 'optimizer.learning_rate': 3e-3, 'optimizer.warmup': 100}

    def validate(self) -> None:
        """The training values, the model's, and the task's."""
        super().validate()
        self.check_model()
        self.spec()
        for key in ('valid_programs', 'test_programs'):
            check_int(key, getattr(self, key), self.batch_size)
        check_int('epoch_segments', self.epoch_segments, 1)
        check_int('train_programs', self.train_programs, 0)
        check_int('data_seed', self.data_seed, 0)
        if self.held_out_layout not in LAYOUTS:
            raise ValueError(f"held_out_layout must be one of {', '.join(LAYOUTS)}, got {self.held_out_layout!r}")
        if self.train_statements:
            parse_train_statements(self.train_statements)

    def experiment_name(self) -> str:
        return f'state_tracking_{self.model_name()}'

    def spec(self) -> ProgramSpec:
        """The programs of validation and test."""
        return ProgramSpec(self.variables, self.statements, self.min_value, self.max_value)

    def statements_at(self, epoch: int) -> int:
        """Statements per training program in `epoch` (the curriculum's stage, else `statements`)."""
        n = self.statements
        for stage, start in parse_train_statements(self.train_statements) if self.train_statements else []:
            if epoch >= start * self.epochs:
                n = stage
        return n

    def local_rows(self) -> range:
        """The streams (batch rows) of this process."""
        local = self.batch_size // self._dist.world_size
        return range(self._dist.rank * local, (self._dist.rank + 1) * local)

    def held_out(self, programs: list) -> LabeledStreams:
        """This process's streams of a held-out split."""
        streams = held_out_streams(programs, vocabulary(self.spec()), self.batch_size,
                                   self.seq_len, self.held_out_layout)
        return streams.rows(self.local_rows())

    def run(self) -> None:
        """Train, then (with `evaluate_test`) evaluate once on the test programs."""
        trainer = self.trainer
        trainer.run()
        if self.evaluate_test:
            self.test(trainer)

    def test(self, trainer) -> None:
        """Evaluate on the test programs; the result and its breakdown go into the history and the checkpoint."""
        test = self.task.test
        breakdown = Breakdown(test)
        loss, accuracy = trainer.evaluate(test, 0, len(test), observe=breakdown.add)
        cells = trainer.sum_over_ranks(breakdown.counts)
        trainer.history['test'] = {'step': trainer.progress['step'], 'loss': loss, 'accuracy': accuracy,
                                   'programs': self.test_programs, **breakdown.report(cells)}
        trainer.log([('Test: ', Text.key), ('loss ', Text.subtle), (f'{loss:.4f}', Text.value),
                     (', accuracy on prints ', Text.subtle), (f'{accuracy:.4f}', Text.value)])
        trainer.save_checkpoint()


@option(StateTrackingConfigs.splits)
def _splits(c: StateTrackingConfigs) -> ProgramSplits:
    return ProgramSplits(c.spec(), c.data_seed, c.valid_programs, c.test_programs, train_seed=c.seed)


@option(StateTrackingConfigs.n_tokens)
def _n_tokens(c: StateTrackingConfigs) -> int:
    # The vocabulary is fixed by the grammar
    return len(vocabulary(c.spec()))


@option(StateTrackingConfigs.task)
def _task(c: StateTrackingConfigs) -> StateTrackingTask:
    vocab = vocabulary(c.spec())

    def make(epoch: int) -> LabeledStreams:
        return training_streams(c.splits, c.statements_at(epoch), vocab, epoch, c.local_rows(), c.epoch_segments,
                                c.seq_len, pool=c.train_programs)

    return StateTrackingTask(vocab, EpochStreams(make, c.epoch_segments), c.held_out(c.splits.valid),
                             c.held_out(c.splits.test))


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m labml_nn.transformers.feedback.state_tracking key=value ...`"""
    run_experiment(StateTrackingConfigs, argv)


if __name__ == '__main__':
    main()
