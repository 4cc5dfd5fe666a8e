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

## What each print asks of a model

`print_facts` reads a program again, independently of the generator, and says of every print what a model needs to
answer it: how far back (in words) the value of the variable was assigned, and which statement last changed it
(`=`, an unconditional `++`/`--`, or the nested statement of an `if` whose condition held). The test accuracy is
broken down by both ([the task](state_tracking.html)): a model that sees only the last $k$ words can answer a print
only when its assignment lies within them, and a value last changed inside a taken `if` needs the value *before*
that statement to decide the condition.

## Vocabulary and splits

The vocabulary is fixed by the grammar, not read from data: the label word `_`, `END`, the keywords, the variable
names and the values, in that order. Programs are drawn from `random.Random` seeded by a string naming the seed and
the split, so the same arguments give the same programs on any machine. The test programs come first, then the
validation programs (skipping any that is a test program), and training programs skip every validation or test
program: no program is in two splits. The held-out splits are named by a data seed of their own, so that runs with
different training seeds are tested on the same programs.

Training programs are either drawn fresh for every epoch and stream, or taken from a fixed **pool** (`pool()`, the
authors' setup: 10,000 training programs reused in every epoch).

The [state-tracking task](state_tracking.html) reads them as streams, and the
[state-tracking experiment](../transformers/feedback/state_tracking.html) trains and tests the models on them.
"""

import random
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch

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

    def with_statements(self, statements: int) -> 'ProgramSpec':
        """The same programs with `statements` statements (a curriculum's stage)."""
        return replace(self, statements=statements)


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


# The statement that last changed a variable, as the test breakdown names it
CHANGED_BY = ('=', '++/--', 'if')
# Buckets of the distance from a print back to the assignment: (name, largest distance in it; `None`: no limit)
DISTANCES = (('<=32', 32), ('33-100', 100), ('>100', None))


@dataclass(frozen=True)
class PrintFact:
    """
    One print of a program: `position`, the index of its `;` (where the label is), the printed `value`, the
    `distance` in words from the word that assigned the variable's value to the `;`, and `changed_by`, the
    statement that last changed the variable (one of `CHANGED_BY`).
    """
    position: int
    value: int
    distance: int
    changed_by: str

    @property
    def bucket(self) -> int:
        """The index of the distance bucket in `DISTANCES`."""
        return next(i for i, (_, top) in enumerate(DISTANCES) if top is None or self.distance <= top)


def print_facts(program: Program) -> List[PrintFact]:
    """
    Every print of `program`, by reading its words (not by asking the generator): the value of each variable,
    the position of the word that assigned it, and the statement that last changed it.
    """
    words = program.tokens
    values: Dict[str, int] = {}
    assigned_at: Dict[str, int] = {}
    changed_by: Dict[str, str] = {}
    facts: List[PrintFact] = []

    def simple(at: int, nested: bool) -> int:
        """Apply `v = n ;`, `v ++ ;` or `v -- ;` at word `at` (the statement of a taken `if` when `nested`)."""
        name, op = words[at], words[at + 1]
        if op == '=':
            values[name], assigned_at[name] = int(words[at + 2]), at + 2
        else:
            values[name] += 1 if op == '++' else -1
        changed_by[name] = 'if' if nested else '=' if op == '=' else '++/--'
        return at + (4 if op == '=' else 3)

    def skip(at: int) -> int:
        """The index after the statement at word `at` (not applied)."""
        return at + (4 if words[at + 1] == '=' else 3)

    i = 0
    while words[i] != END:
        if words[i] == 'print':
            name = words[i + 1]
            facts.append(PrintFact(i + 2, values[name], i + 2 - assigned_at[name], changed_by[name]))
            i += 3
        elif words[i] == 'if':
            # `if a < b : <statement>`, `b` a variable or a value
            name, less, bound = words[i + 1], words[i + 2] == '<', words[i + 3]
            limit = values[bound] if bound in values else int(bound)
            holds = values[name] < limit if less else values[name] > limit
            i = simple(i + 5, True) if holds else skip(i + 5)
        else:
            i = simple(i, False)
    return facts


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

    * `seed`: names the held-out splits' random streams; `valid_programs`, `test_programs`: their sizes
    * `train_seed`: names the training programs' streams (default: `seed`)
    """

    def __init__(self, spec: ProgramSpec, seed: int, valid_programs: int, test_programs: int,
                 train_seed: Optional[int] = None):
        self.spec = spec
        self.seed = seed
        self.train_seed = seed if train_seed is None else train_seed
        self.test = generate_programs(spec, test_programs, f'{seed}/test')
        self.valid = generate_programs(spec, valid_programs, f'{seed}/valid', exclude=self.test)
        self._held_out = self.valid + self.test
        self._pools: Dict[Tuple[ProgramSpec, int], List[Program]] = {}

    def train(self, n: int, part: str, spec: Optional[ProgramSpec] = None) -> List[Program]:
        """
        `n` training programs from the stream named `part` (e.g. an epoch and a stream), of `spec` (default: the
        splits' own; a curriculum passes shorter programs), never a validation or test program.
        """
        return generate_programs(spec or self.spec, n, f'{self.train_seed}/train/{part}', exclude=self._held_out)

    def pool(self, n: int, spec: Optional[ProgramSpec] = None) -> List[Program]:
        """A fixed set of `n` training programs of `spec` (made once, then the same list every time)."""
        spec = spec or self.spec
        if (spec, n) not in self._pools:
            self._pools[spec, n] = generate_programs(spec, n, f'{self.train_seed}/pool/{spec.statements}',
                                                     exclude=self._held_out)
        return self._pools[spec, n]


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
