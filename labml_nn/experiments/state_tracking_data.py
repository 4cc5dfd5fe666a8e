r"""
---
title: Programs for the algorithmic state-tracking task
summary: A seeded generator of small programs over a few integer variables, their word-level vocabulary, the label
  of every token (the value a print shows), and train/valid/test splits that never share a program.
---

# The state-tracking task

The Feedback Transformer paper (section 4.1.2) shows what the feedback memory buys on a task a parallel transformer
of limited attention span cannot do: reading a long program one word at a time and, at every `print`, saying the
value of a variable. A program is a run of statements over a few variables `x, y, z, ...`:

| statement | meaning |
|---|---|
| `x = 7 ;` | a variable gets its first value (only a variable that has none yet) |
| `x ++ ;`, `x -- ;` | add or subtract one (never leaving the value range) |
| `if x < y : z ++ ;`, `if x > 4 : z -- ;` | one nested statement, applied only when the comparison holds |
| `print x ;` | the value of `x` is the answer at the `;` |

and ends with the word `END`. Every token has a **label**: `_` (nothing to say) everywhere except at the `;` of
`print x ;`, whose label is the value of `x`. Training and the accuracy count only those positions.

Nothing in the input ever shows a value after its assignment: the model has to keep every variable's value up to
date as it reads, including through the conditional statements, whose effect depends on the current values. A
model that can look back only $S$ tokens and only through a fixed number of layers cannot recover an assignment
made long before; a model with a recurrent state (the feedback memory) can carry it.

## The grammar

Each statement is drawn the same way as in the authors' generator (`data/gen_data_algo_seq.py` of
facebookresearch/transformer-sequential), written here from its description: pick one of `=`, `++`, `--`, `if`,
`print` uniformly; if it cannot be made (no variable left to assign, `++` at the maximum, `print` inside an `if`,
a two-variable comparison with fewer than two variables assigned, ...), pick again. An `if` compares a variable
with another variable or with a random value, with `<` or `>` equally likely, and its nested statement is drawn
under the same rules, minus `if` and `print`. A nested statement that is **not** applied is still drawn against
the current values, so that `x ++` appears only while `x` is below the maximum, applied or not; a nested `x = 3`
that is not applied leaves `x` without a value.

## Vocabulary and splits

The vocabulary is fixed by the grammar, not read from data: the label word `_`, `END`, the keywords, the variable
names and the values, in that order. Programs are drawn from `random.Random` seeded by a string naming the seed and
the split, so the same arguments give the same programs on any machine. The test programs come first, then the
validation programs (skipping any that is a test program), and training programs skip every validation or test
program: no program is in two splits.

The [state-tracking experiment](../transformers/feedback/state_tracking.html) trains and tests the models on them.
"""

import random
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch

from labml_nn.experiments.text_data import SequenceBatches

# The variable names in the order programs use them (the authors' five first)
VARIABLE_NAMES = ('x', 'y', 'z', 'p', 'r', 'a', 'b', 'c')
# The label of every position that is not the `;` of a `print`
NO_LABEL = '_'
END = 'END'
KEYWORDS = (';', ':', '=', '++', '--', '<', '>', 'if', 'print')
OPERATIONS = ('=', '++', '--', 'if', 'print')
# Attempts to draw a program that is not in an excluded split before giving up
MAX_REJECTIONS = 10_000


@dataclass(frozen=True)
class ProgramSpec:
    """
    * `variables`: how many variables programs use (the first `variables` of `VARIABLE_NAMES`)
    * `statements`: statements per program (before `END`)
    * `min_value`, `max_value`: the value range, inclusive
    """
    variables: int = 3
    statements: int = 100
    min_value: int = 1
    max_value: int = 10

    def __post_init__(self):
        if not isinstance(self.variables, int) or not 1 <= self.variables <= len(VARIABLE_NAMES):
            raise ValueError(f"variables must be an int in [1, {len(VARIABLE_NAMES)}], "
                             f"got {self.variables!r}")
        if not isinstance(self.statements, int) or self.statements < 1:
            raise ValueError(f"statements must be an int >= 1, got {self.statements!r}")
        if not isinstance(self.min_value, int) or not isinstance(self.max_value, int) or \
                self.max_value <= self.min_value:
            raise ValueError(f"min_value and max_value must be ints with min_value < max_value, "
                             f"got {self.min_value!r}, {self.max_value!r}")

    @property
    def names(self) -> Tuple[str, ...]:
        return VARIABLE_NAMES[:self.variables]

    @property
    def values(self) -> Tuple[str, ...]:
        return tuple(str(v) for v in range(self.min_value, self.max_value + 1))


def vocabulary(spec: ProgramSpec) -> List[str]:
    """Every word of the task, the label word `_` first: `_`, `END`, keywords, variables, values."""
    return [NO_LABEL, END, *KEYWORDS, *spec.names, *spec.values]


@dataclass(frozen=True)
class Program:
    """A program's words and the label of each word (same length)."""
    tokens: Tuple[str, ...]
    labels: Tuple[str, ...]


def _statement(rng: random.Random, spec: ProgramSpec, values: Dict[str, int],
               nested: bool) -> Tuple[List[str], Optional[int]]:
    """
    Draw one statement, updating `values` (variable to value) as it runs. Returns its words and the printed value
    (`None` unless it is a `print`).
    """
    while True:
        op = rng.choice(OPERATIONS)
        assigned = [n for n in spec.names if n in values]
        if op == '=':
            free = [n for n in spec.names if n not in values]
            if not free:
                continue
            name = rng.choice(free)
            values[name] = rng.randint(spec.min_value, spec.max_value)
            return [name, '=', str(values[name]), ';'], None
        if not assigned:
            continue
        if op in ('++', '--'):
            name = rng.choice(assigned)
            step = 1 if op == '++' else -1
            if not spec.min_value <= values[name] + step <= spec.max_value:
                continue
            values[name] += step
            return [name, op, ';'], None
        if nested:
            # No `print` and no second `if` inside an `if`
            continue
        if op == 'print':
            name = rng.choice(assigned)
            return ['print', name, ';'], values[name]
        # `if`: compare with another variable or with a value
        if rng.random() < 0.5:
            if len(assigned) < 2:
                continue
            name, other = rng.sample(assigned, 2)
            bound, bound_word = values[other], other
        else:
            name = rng.choice(assigned)
            bound = rng.randint(spec.min_value, spec.max_value)
            bound_word = str(bound)
        less = rng.random() < 0.5
        holds = values[name] < bound if less else values[name] > bound
        # A nested statement that is not applied runs on a copy, which is then forgotten
        inner, _ = _statement(rng, spec, values if holds else dict(values), True)
        return ['if', name, '<' if less else '>', bound_word, ':', *inner], None


def generate_program(rng: random.Random, spec: ProgramSpec) -> Program:
    """One program of `spec.statements` statements and `END`, with the label of every word."""
    values: Dict[str, int] = {}
    tokens: List[str] = []
    labels: List[str] = []
    for _ in range(spec.statements):
        words, printed = _statement(rng, spec, values, False)
        tokens += words
        labels += [NO_LABEL] * (len(words) - 1) + [NO_LABEL if printed is None else str(printed)]
    return Program(tuple(tokens + [END]), tuple(labels + [NO_LABEL]))


def generate_programs(spec: ProgramSpec, n: int, key: str, exclude: Iterable[Program] = ()) -> List[Program]:
    """
    `n` programs from the random stream named `key` (e.g. `"5/test"`), skipping any program in `exclude`.
    The same arguments give the same programs. A `ValueError` if `exclude` holds (nearly) every possible program.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    excluded: Set[Tuple[str, ...]] = {p.tokens for p in exclude}
    rng = random.Random(key)
    programs: List[Program] = []
    rejected = 0
    while len(programs) < n:
        program = generate_program(rng, spec)
        if program.tokens in excluded:
            rejected += 1
            if rejected > MAX_REJECTIONS:
                raise ValueError(f"{spec} has too few distinct programs: {rejected} drawn in a row were in "
                                 f"another split; use longer programs or more variables")
            continue
        rejected = 0
        programs.append(program)
    return programs


class ProgramSplits:
    """
    Validation and test programs of `spec`, and training programs that are neither.

    * `seed`: names every random stream; `valid_programs`, `test_programs`: the sizes of the two fixed splits
    """

    def __init__(self, spec: ProgramSpec, seed: int, valid_programs: int, test_programs: int):
        self.spec = spec
        self.seed = seed
        self.test = generate_programs(spec, test_programs, f'{seed}/test')
        self.valid = generate_programs(spec, valid_programs, f'{seed}/valid', exclude=self.test)
        self._held_out = self.valid + self.test

    def train(self, n: int, part: str, spec: Optional[ProgramSpec] = None) -> List[Program]:
        """
        `n` training programs from the stream named `part` (e.g. an epoch and a stream), of `spec` (default: the
        splits' own; a curriculum passes shorter programs), never a validation or test program.
        """
        return generate_programs(spec or self.spec, n, f'{self.seed}/train/{part}', exclude=self._held_out)


def encode_stream(programs: List[Program], vocab: List[str], length: Optional[int] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Programs one after the other as token ids and label ids, each `[n_tokens]` (`torch.long`). With `length`, cut
    to `length` tokens, or padded up to it with `END` (label `_`) when the programs are shorter.
    """
    index = {word: i for i, word in enumerate(vocab)}
    tokens = [index[w] for p in programs for w in p.tokens]
    labels = [index[w] for p in programs for w in p.labels]
    if length is not None:
        pad = max(0, length - len(tokens))
        tokens = tokens[:length] + [index[END]] * pad
        labels = labels[:length] + [index[NO_LABEL]] * pad
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


# ## Streams
#
# Training reads programs as long **streams**, one per batch row, cut into segments of `seq_len` tokens; batch $i$
# holds segment $i$ of every stream, and a model may carry its state from one segment to the next (as the
# authors' code does). The streams of the held-out splits are made of whole programs, so that every validation or
# test program is read from its first word with the state its own stream has at that point.

class LabeledStreams:
    """
    Batches of `streams` `[n_streams, stream_len]` token ids and their `labels` (same shape): batch `idx` is
    `(data, target)`, each `[seq_len, n_streams]`, the tokens and labels of segment `idx` of every stream.
    """

    def __init__(self, streams: torch.Tensor, labels: torch.Tensor, seq_len: int):
        if streams.dim() != 2 or streams.shape != labels.shape:
            raise ValueError(f"streams and labels must both be [n_streams, stream_len], "
                             f"got {list(streams.shape)} and {list(labels.shape)}")
        if seq_len < 1 or streams.shape[1] < seq_len:
            raise ValueError(f"seq_len must be in [1, stream_len={streams.shape[1]}], got {seq_len}")
        self.streams, self.labels, self.seq_len = streams, labels, seq_len

    def __len__(self) -> int:
        return self.streams.shape[1] // self.seq_len

    def batch(self, epoch: int, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Segment `idx` of every stream (the streams do not depend on `epoch`)."""
        part = slice(idx * self.seq_len, (idx + 1) * self.seq_len)
        return self.streams[:, part].t(), self.labels[:, part].t()

    # Batches `start .. end - 1` as `(idx, data, target)`, as the text's batches
    iterate = SequenceBatches.iterate


def held_out_streams(programs: List[Program], vocab: List[str], n_streams: int,
                     seq_len: int) -> LabeledStreams:
    """
    Whole `programs` dealt to `n_streams` streams (each program to the stream with the fewest tokens so far), every
    stream padded with `END` (label `_`) to the same multiple of `seq_len`.
    """
    if n_streams < 1 or len(programs) < n_streams:
        raise ValueError(f"need at least one program per stream: {len(programs)} programs, "
                         f"{n_streams} streams")
    dealt: List[List[Program]] = [[] for _ in range(n_streams)]
    sizes = [0] * n_streams
    for program in programs:
        r = sizes.index(min(sizes))
        dealt[r].append(program)
        sizes[r] += len(program.tokens)
    length = -(-max(sizes) // seq_len) * seq_len
    pairs = [encode_stream(d, vocab, length) for d in dealt]
    return LabeledStreams(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), seq_len)


def training_streams(splits: ProgramSplits, spec: ProgramSpec, vocab: List[str], epoch: int, rows: range,
                     n_segments: int, seq_len: int) -> LabeledStreams:
    """
    The training streams `rows` of `epoch`: each a run of fresh programs of `spec` (from a random stream of its own,
    so any process can make any row), cut to `n_segments * seq_len` tokens.
    """
    length = n_segments * seq_len
    # A program has at least 3 words per statement and `END`: enough programs to fill the stream
    n = -(-length // (3 * spec.statements + 1))
    pairs = [encode_stream(splits.train(n, f'{epoch}/{r}/{spec.statements}', spec), vocab, length)
             for r in rows]
    return LabeledStreams(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), seq_len)
