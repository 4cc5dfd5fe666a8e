r"""
---
title: "The state-tracking task: streams of programs, loss on the prints"
summary: Programs read as long streams cut into segments, the loss and accuracy on print positions only, and the
  test accuracy broken down by how far back the assignment is and which statement last changed the variable.
---

# The state-tracking task

The paper's algorithmic task (section 4.1.2): read a [program](programs.html) one word at a time and, at the `;` of
every `print x ;`, predict the value of `x`. The loss and the accuracy count only those positions.

## Streams

As in the authors' code, programs are read as long **streams**, one per batch row, cut into segments of `seq_len`
words; batch $i$ holds segment $i$ of every stream, and a model carries its state from one segment to the next
(`carry_memory`). Training streams are runs of training programs, new ones every epoch (or drawn from a fixed pool).
The held-out streams are laid out one of two ways:

* `whole` (default): whole programs dealt to the streams, so every validation or test program is read from its first
  word, with the state its stream has at that point;
* `cut` (the authors'): all programs one after the other, cut into as many equal rows as there are streams, as
  their `batchify` does. A program that straddles a cut starts its row in its middle: its prints after the cut ask
  for a value assigned before the row began, which no model can know.

## The test, broken down

A print's label is a value in $[1, 10]$ (chance: 0.10). Besides the accuracy over all prints, the test reports it
by the distance in words from the print back to the word that assigned the variable (`<=32`, `33-100`, `>100`) and
by the statement that last changed the variable (`=`, `++/--`, a taken `if`): a model that sees only the last 33
words can only know the first bucket, and a value last changed inside a taken `if` needed the value before it to
decide the condition.
"""

from functools import lru_cache
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from labml_nn.tasks.programs import (
    CHANGED_BY,
    DISTANCES,
    Program,
    ProgramSplits,
    encode_stream,
    print_facts,
)
from labml_nn.tasks.text import SequenceBatches

# The id of the label word `_` (first in the vocabulary): positions with it are not counted
NO_LABEL_ID = 0
# Layouts of the held-out streams
LAYOUTS = ('whole', 'cut')


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
    """The task's words: ids of a space-separated string, and the word of each id."""

    def __init__(self, words: List[str]):
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}
        self.n_tokens = len(words)

    def text_to_i(self, text: str) -> torch.Tensor:
        return torch.tensor([self.stoi[w] for w in text.split() if w in self.stoi], dtype=torch.long)


class LabeledStreams:
    """
    Batches of `streams` `[n_streams, stream_len]` token ids and their `labels` (same shape): batch `idx` is
    `(data, target)`, each `[seq_len, n_streams]`, the tokens and labels of segment `idx` of every stream.
    `facts` (same shape, optional) holds at every print the index of its breakdown cell
    (`distance bucket * len(CHANGED_BY) + change`), and -1 elsewhere.
    """

    def __init__(self, streams: torch.Tensor, labels: torch.Tensor, seq_len: int,
                 facts: Optional[torch.Tensor] = None):
        if streams.dim() != 2 or streams.shape != labels.shape:
            raise ValueError(f"streams and labels must both be [n_streams, stream_len], "
                             f"got {list(streams.shape)} and {list(labels.shape)}")
        if seq_len < 1 or streams.shape[1] < seq_len:
            raise ValueError(f"seq_len must be in [1, stream_len={streams.shape[1]}], got {seq_len}")
        self.streams, self.labels, self.seq_len, self.facts = streams, labels, seq_len, facts

    def __len__(self) -> int:
        return self.streams.shape[1] // self.seq_len

    def batch(self, epoch: int, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Segment `idx` of every stream (the streams do not depend on `epoch`)."""
        part = slice(idx * self.seq_len, (idx + 1) * self.seq_len)
        return self.streams[:, part].t(), self.labels[:, part].t()

    def batch_facts(self, idx: int) -> torch.Tensor:
        """The breakdown cells of segment `idx`, `[seq_len, n_streams]`."""
        return self.facts[:, idx * self.seq_len:(idx + 1) * self.seq_len].t()

    def rows(self, rows: range) -> 'LabeledStreams':
        """The streams `rows` alone (a data-parallel rank's share)."""
        part = slice(rows.start, rows.stop)
        return LabeledStreams(self.streams[part], self.labels[part], self.seq_len,
                              None if self.facts is None else self.facts[part])

    # Batches `start .. end - 1` as `(idx, data, target)`, as the text's batches
    iterate = SequenceBatches.iterate


def _fact_cells(program: Program) -> List[int]:
    """The breakdown cell of every word of `program` (-1 where it is not a print's `;`)."""
    cells = [-1] * len(program.tokens)
    for fact in print_facts(program):
        cells[fact.position] = fact.bucket * len(CHANGED_BY) + CHANGED_BY.index(fact.changed_by)
    return cells


def held_out_streams(programs: List[Program], vocab: List[str], n_streams: int, seq_len: int,
                     layout: str = 'whole') -> LabeledStreams:
    """
    The streams of a held-out split, with the breakdown cell of every print (`facts`):

    * `whole`: whole `programs` dealt to `n_streams` streams (each program to the stream with the fewest tokens so
      far), every stream padded with `END` (label `_`) to the same multiple of `seq_len`;
    * `cut`: the programs one after the other, cut into `n_streams` rows of equal length (the rest dropped).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if n_streams < 1 or len(programs) < n_streams:
        raise ValueError(f"need at least one program per stream: {len(programs)} programs, "
                         f"{n_streams} streams")
    if layout == 'cut':
        tokens, labels = encode_stream(programs, vocab)
        cells = torch.tensor([c for p in programs for c in _fact_cells(p)], dtype=torch.long)
        length = tokens.shape[0] // n_streams
        if length < seq_len:
            raise ValueError(f"{len(programs)} programs cut into {n_streams} rows give rows of {length} words, "
                             f"shorter than seq_len={seq_len}")
        rows = [t[:n_streams * length].view(n_streams, length) for t in (tokens, labels, cells)]
        return LabeledStreams(rows[0], rows[1], seq_len, facts=rows[2])
    dealt: List[List[Program]] = [[] for _ in range(n_streams)]
    sizes = [0] * n_streams
    for program in programs:
        r = sizes.index(min(sizes))
        dealt[r].append(program)
        sizes[r] += len(program.tokens)
    length = -(-max(sizes) // seq_len) * seq_len
    pairs = [encode_stream(d, vocab, length) for d in dealt]
    cells = [[c for p in d for c in _fact_cells(p)] for d in dealt]
    facts = torch.tensor([row + [-1] * (length - len(row)) for row in cells], dtype=torch.long)
    return LabeledStreams(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), seq_len, facts)


def training_streams(splits: ProgramSplits, statements: int, vocab: List[str], epoch: int, rows: range,
                     n_segments: int, seq_len: int, pool: int = 0) -> LabeledStreams:
    """
    The training streams `rows` of `epoch`: each a run of programs of `statements` statements, cut to
    `n_segments * seq_len` words. Fresh programs (from a random stream of their own, so any process can make any
    row), or, with `pool` > 0, programs drawn at random from a fixed set of `pool` training programs.
    """
    spec = splits.spec.with_statements(statements)
    length = n_segments * seq_len
    # A program has at least 3 words per statement and `END`: enough programs to fill the stream
    n = -(-length // (3 * spec.statements + 1))
    if pool > 0:
        programs = splits.pool(pool, spec)

        def picks(r: int) -> List[Program]:
            # Row `r`'s draws depend on the seed, the epoch and the row only
            generator = torch.Generator().manual_seed(hash_key(f'{splits.train_seed}/{epoch}/{r}'))
            return [programs[i] for i in torch.randint(len(programs), (n,), generator=generator).tolist()]

        pairs = [encode_stream(picks(r), vocab, length) for r in rows]
    else:
        pairs = [encode_stream(splits.train(n, f'{epoch}/{r}/{spec.statements}', spec), vocab, length)
                 for r in rows]
    return LabeledStreams(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), seq_len)


def hash_key(key: str) -> int:
    """A seed from a string, the same in every process (Python's `hash` of a string is not)."""
    return int.from_bytes(key.encode(), 'little') % (2 ** 63)


class EpochStreams:
    """
    Training batches: for every epoch, the streams of programs `make(epoch)` (a `LabeledStreams`), made when the
    epoch is first asked for. Every epoch has `n_segments` batches.
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


class Breakdown:
    """Counts of correct and counted prints per breakdown cell, `[2, cells]`, summed over the test's batches."""

    def __init__(self, streams: LabeledStreams):
        self.streams = streams
        self.counts = torch.zeros(2, len(DISTANCES) * len(CHANGED_BY), dtype=torch.float64)

    def add(self, idx: int, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add segment `idx`'s prints: `logits` `[seq_len, batch_size, n_tokens]`, `target` its labels."""
        cells = self.streams.batch_facts(idx).to(target.device)
        printed = cells >= 0
        right = (logits.argmax(dim=-1) == target)[printed]
        cell = cells[printed]
        self.counts[0].index_add_(0, cell.cpu(), right.double().cpu())
        self.counts[1].index_add_(0, cell.cpu(), torch.ones_like(right, dtype=torch.float64).cpu())

    def report(self, counts: Optional[torch.Tensor] = None) -> Dict[str, Dict[str, Dict[str, float]]]:
        """
        Accuracy and number of prints by distance bucket and by last change, from `counts` (default: this
        process's; the trainer passes the sum over ranks).
        """
        c = (self.counts if counts is None else counts).view(2, len(DISTANCES), len(CHANGED_BY))

        def cells(correct: torch.Tensor, count: torch.Tensor, names: List[str]) -> Dict[str, Dict[str, float]]:
            return {name: {'accuracy': float(r / n) if n > 0 else float('nan'), 'prints': int(n)}
                    for name, r, n in zip(names, correct.tolist(), count.tolist())}

        return {'distance': cells(c[0].sum(1), c[1].sum(1), [name for name, _ in DISTANCES]),
                'changed_by': cells(c[0].sum(0), c[1].sum(0), list(CHANGED_BY))}


class StateTrackingTask:
    """
    The task as the trainer sees it: the `vocab`ulary, `train` batches (`EpochStreams`), `valid` and `test`
    streams (`LabeledStreams`), the masked loss, and no samples.
    """

    def __init__(self, vocab: List[str], train: EpochStreams, valid: LabeledStreams, test: LabeledStreams):
        self.itos = vocab
        self.n_tokens = len(vocab)
        self.train, self.valid, self.test = train, valid, test
        # Held-out streams are only read whole, from their start (at the end of every epoch)
        self.valid_in_parts = False

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """The masked loss, the number of correct prints and the number of prints of a batch."""
        loss, correct, count = masked_loss(logits, target)
        return loss, correct, int(count)

    def record(self) -> Dict[str, Any]:
        """What a checkpoint keeps of the data: the vocabulary (fixed by the grammar)."""
        return {'itos': list(self.itos)}

    def sample(self, model: torch.nn.Module, device: torch.device, autocast: ContextManager) -> None:
        """The models predict labels, not the next word: nothing to sample."""
        return None
