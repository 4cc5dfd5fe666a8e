r"""
---
title: "The text task: next-character prediction"
summary: Finding (or downloading) Tiny Shakespeare, cutting it into shuffled batches or contiguous streams, and the
  task's loss, accuracy and samples.
---

# The text task

A character-level language model reads tokens $x_0 \dots x_{T-1}$ and predicts each next one; training minimizes
the cross entropy

$$\mathcal{L} = -\frac{1}{T}\sum_{t} \log p_\theta(x_{t+1} \mid x_0 \dots x_t),$$

and the accuracy counts the positions where the most likely character is the next one. The task (`TextTask`) is
that loss and accuracy, the batches of a text, and a greedy sample of the model's continuation of a prompt, which
[the trainer](../experiments/trainer.html) prints while it trains.

## The text

The experiments train on [Tiny Shakespeare](https://github.com/karpathy/char-rnn), about a million characters
of plays. Every character is a token. The first 90% of the text is for training, the last 10% for validation.
The file must be UTF-8 text: anything else (`text_path=/bin/ls`) stops with a message naming the file and the
first byte that is not.

## The vocabulary belongs to the model

The vocabulary is the sorted set of the text's characters, and a token id means "the $i$-th character of *that*
set". A model trained on one text reads garbage from another text with as many distinct characters, so a checkpoint
stores its vocabulary (`itos`), the absolute path of the text and its SHA-256. `load_text(..., itos=...)` reads a
text with a given vocabulary instead of its own (resuming, or fine-tuning on a new text): a character outside it
is an error.

## Where the file comes from

In order of preference:

1. `text_path=/path/file` on the command line,
2. the environment variable `TINY_SHAKESPEARE_PATH`,
3. `tiny_shakespeare.txt` in labml's data folder, downloaded once from the char-rnn repository if missing.

## Batches

The text is cut into non-overlapping sequences of `seq_len + 1` characters (input and the same shifted by one
as target). Every epoch visits them in a new random order, each nudged by a random offset smaller than
`seq_len` so that the model does not always see the same boundaries. The order and the offsets are a pure
function of `(seed, epoch)`: nothing is kept between epochs, so training can stop anywhere and resume at the
same batch, and every data-parallel rank can compute the same plan and take its own slice of each batch without
talking to the others.

## Contiguous streams, for memory carried across batches

With `carry_memory=True` ([the trainer](../experiments/trainer.html)) the training text is cut into `batch_size`
**contiguous streams**, one per batch row,

$$\text{stream}_r = x_{rL} \dots x_{(r+1)L}, \qquad
  L = \Big\lfloor \frac{N - 1}{\text{batch\_size}} \Big\rfloor,$$

and batch $i$ holds segment $i$ of every stream: tokens $rL + i\,T \dots rL + (i+1)\,T$ for $T$ = `seq_len`, so
the model's state after batch $i$ is where batch $i + 1$ continues. Validation reads its text as streams the same
way.
"""

import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from labml_helpers.datasets.text import TextDataset

TINY_SHAKESPEARE_URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/'
                        'data/tinyshakespeare/input.txt')
TINY_SHAKESPEARE_ENV = 'TINY_SHAKESPEARE_PATH'

_HOW_TO_PROVIDE = (f"Provide the file with text_path=/path/to/tiny_shakespeare.txt on the command line, "
                   f"or set the environment variable {TINY_SHAKESPEARE_ENV}=/path/to/tiny_shakespeare.txt "
                   f"(download it from {TINY_SHAKESPEARE_URL}).")


def character_tokenizer(text: str) -> List[str]:
    """Every character is a token."""
    return list(text)


def _check_text_file(path: Path, origin: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Tiny Shakespeare file not found at {path} (from {origin}). "
                                f"{_HOW_TO_PROVIDE}")
    if path.stat().st_size == 0:
        raise ValueError(f"Tiny Shakespeare file {path} (from {origin}) is empty. {_HOW_TO_PROVIDE}")
    return path


class Vocabulary(NamedTuple):
    """Token `i` is the string `itos[i]`; `stoi` maps back."""
    itos: List[str]
    stoi: Dict[str, int]

    @staticmethod
    def of(itos: Sequence[str]) -> 'Vocabulary':
        return Vocabulary(list(itos), {s: i for i, s in enumerate(itos)})


def read_utf8(path: Path, key: str = 'text_path') -> Tuple[str, str]:
    """The text of `path` and the SHA-256 of its bytes; a `ValueError` naming the file unless it is UTF-8."""
    data = path.read_bytes()
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise ValueError(f"{key}={path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start:,} is not valid UTF-8); train on a UTF-8 text file") from None
    return text, hashlib.sha256(data).hexdigest()


def load_text(path: Path, tokenizer: Callable, itos: Optional[Sequence[str]] = None,
              read: Optional[Tuple[str, str]] = None) -> TextDataset:
    """
    The dataset of a UTF-8 text file: the first 90% of the characters train, the last 10% validate. Its vocabulary
    is the text's own, or `itos` when given (every token of the text must be in it). The dataset also carries
    `path` (absolute) and `sha256`, which checkpoints record. `read` is what `read_utf8(path)` returned, if known.
    """
    path = Path(path).absolute()
    text, sha256 = read or read_utf8(path)
    split = int(len(text) * 0.9)
    if itos is None:
        dataset = TextDataset(path, tokenizer, text[:split], text[split:], '')
    else:
        unknown = sorted(set(tokenizer(text)) - set(itos))
        if unknown:
            raise ValueError(f"text_path={path} has {len(unknown)} characters that are not in the "
                             f"checkpoint's vocabulary of {len(itos)}: {''.join(unknown[:20])!r}")
        vocabulary = Vocabulary.of(itos)
        dataset = TextDataset(path, tokenizer, text[:split], text[split:], '', n_tokens=len(itos),
                              stoi=vocabulary.stoi, itos=vocabulary.itos)
    dataset.sha256 = sha256
    return dataset


def check_same_text(data: Dict[str, Any], path: Path, sha256: str, resume: str, allow_text_change: bool) -> None:
    """A `ValueError` when resuming (`resume=`) on a text other than the checkpoint's `data`, unless allowed."""
    if data.get('sha256') and data['sha256'] != sha256 and not allow_text_change:
        raise ValueError(f"resume={resume}: the checkpoint was trained on {data['path']} (sha256 "
                         f"{data['sha256'][:12]}...), this run reads {path} (sha256 {sha256[:12]}...); "
                         f"set allow_text_change=true to continue training on this text with the "
                         f"checkpoint's vocabulary")


def download_text(url: str, path: Path) -> None:
    """
    Download `url` to `path` through a temporary file, so an interrupted download never leaves a partial file
    where the next run would take it for the real one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f'.{os.getpid()}.download')
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, 'wb') as f:
            while chunk := response.read(1 << 16):
                f.write(chunk)
        os.replace(tmp, path)
    except OSError as e:
        raise RuntimeError(f"Could not download Tiny Shakespeare from {url}: {e}. {_HOW_TO_PROVIDE}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def resolve_text_path(text_path: str, data_folder: Optional[Path], url: str = TINY_SHAKESPEARE_URL) -> Path:
    """
    The text file to train on: `text_path` if given, else `$TINY_SHAKESPEARE_PATH`, else
    `data_folder/tiny_shakespeare.txt`, downloaded from `url` if it is not there yet.
    """
    if text_path:
        return _check_text_file(Path(text_path).expanduser(), 'text_path')
    env_path = os.environ.get(TINY_SHAKESPEARE_ENV, '')
    if env_path:
        return _check_text_file(Path(env_path).expanduser(), TINY_SHAKESPEARE_ENV)
    if data_folder is None:
        raise FileNotFoundError(f"No data folder is configured for labml. {_HOW_TO_PROVIDE}")
    path = Path(data_folder) / 'tiny_shakespeare.txt'
    if not path.exists():
        download_text(url, path)
    return _check_text_file(path, 'labml data folder')


def check_batch_args(data: torch.Tensor, seq_len: int, batch_size: int, world_size: int) -> None:
    """A `ValueError` naming the argument unless `data` is 1-D and the sizes fit `world_size` ranks."""
    if data.dim() != 1:
        raise ValueError(f"data must be a 1-D tensor of token ids, got shape {list(data.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if batch_size < 1 or batch_size % world_size != 0:
        raise ValueError(f"batch_size (global) must be a positive multiple of the world size {world_size}, "
                         f"got {batch_size}")


class SequenceBatches:
    """
    Shuffled batches of sequences from one long token tensor.

    * `data`: the whole text as token ids, `[n_tokens]`
    * `batch_size`: the *global* batch size; with `world_size` ranks, rank `r` gets rows
      `r * batch_size / world_size ... (r + 1) * batch_size / world_size - 1` of every batch
    * `shuffle`: a new order every epoch (else the text order)
    * `random_offset`: shift each sequence by a random amount below `seq_len`

    Batches are `(data, target)`, both `[seq_len, batch_size / world_size]`. The last, incomplete batch of an
    epoch is dropped so every step has the same size on every rank.
    """

    def __init__(self, data: torch.Tensor, *, seq_len: int, batch_size: int, shuffle: bool = True,
                 random_offset: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        check_batch_args(data, seq_len, batch_size, world_size)
        self.data = data
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.random_offset = random_offset
        self.seed = seed
        self.local_batch_size = batch_size // world_size
        self.rank = rank
        self.n_sequences = (data.shape[0] - 1) // seq_len
        if len(self) == 0:
            raise ValueError(f"The text ({data.shape[0]:,} tokens) is too short for one batch of "
                             f"batch_size={batch_size} sequences of seq_len={seq_len}")
        # Positions `0 .. seq_len` inside a sequence, hoisted out of every batch
        self._arange = torch.arange(seq_len + 1)
        self._plan_epoch: Optional[int] = None
        self._plan: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.n_sequences // self.batch_size

    def plan(self, epoch: int) -> torch.Tensor:
        """The start of every sequence of `epoch`, in visiting order, `[len(self) * batch_size]`."""
        if self._plan_epoch != epoch:
            starts = torch.arange(self.n_sequences) * self.seq_len
            if self.shuffle or self.random_offset:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                if self.random_offset:
                    # At most `seq_len - 1`, and never past the end of the text
                    room = (self.data.shape[0] - 1 - self.seq_len - starts).clamp(max=self.seq_len - 1)
                    starts = starts + (torch.rand(self.n_sequences, generator=generator) * (room + 1)).long()
                if self.shuffle:
                    starts = starts[torch.randperm(self.n_sequences, generator=generator)]
            self._plan = starts[:len(self) * self.batch_size]
            self._plan_epoch = epoch
        return self._plan

    def batch(self, epoch: int, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batch `idx` of `epoch`, this rank's share: `(data, target)`, each `[seq_len, local_batch_size]`."""
        first = idx * self.batch_size + self.rank * self.local_batch_size
        starts = self.plan(epoch)[first:first + self.local_batch_size]
        # `[seq_len + 1, local_batch_size]` token ids
        seqs = self.data[starts[None, :] + self._arange[:, None]]
        return seqs[:-1], seqs[1:]

    def iterate(self, epoch: int, start: int, end: int) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        """Batches `start .. end - 1` of `epoch` as `(idx, data, target)`."""
        for idx in range(start, end):
            data, target = self.batch(epoch, idx)
            yield idx, data, target


class ContiguousStreams:
    """
    Batches for memory carried across batches: row `r` of batch `i` is segment `i` of stream `r`.

    * `data`: the whole text as token ids, `[n_tokens]`
    * `batch_size`: the *global* batch (number of streams); rank `r` of `world_size` gets rows
      `r * batch_size / world_size ... (r + 1) * batch_size / world_size - 1`, its own streams

    Batches are `(data, target)`, both `[seq_len, batch_size / world_size]`; the same in every epoch.
    """

    def __init__(self, data: torch.Tensor, *, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        check_batch_args(data, seq_len, batch_size, world_size)
        self.data = data
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        # $L$: tokens per stream (its last one is only a target)
        self.stream_len = (data.shape[0] - 1) // batch_size
        if len(self) == 0:
            raise ValueError(f"The text ({data.shape[0]:,} tokens) is too short for {batch_size} "
                             f"contiguous streams of at least seq_len={seq_len} tokens each")
        # The first token of this rank's streams, `[local_batch_size]`
        first = rank * self.local_batch_size
        self.starts = torch.arange(first, first + self.local_batch_size) * self.stream_len
        self._arange = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return self.stream_len // self.seq_len

    def batch(self, epoch: int, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Segment `idx` of this rank's streams: `(data, target)`, each `[seq_len, local_batch_size]`."""
        starts = self.starts + idx * self.seq_len
        seqs = self.data[starts[None, :] + self._arange[:, None]]
        return seqs[:-1], seqs[1:]

    # Batches `start .. end - 1` as `(idx, data, target)`; `epoch` changes nothing (the streams are fixed)
    iterate = SequenceBatches.iterate


class TextTask:
    """
    Next-character prediction on `text` (a `TextDataset` from `load_text`), with its `train` and `valid` batches
    (`SequenceBatches` or `ContiguousStreams`). During training a sample continues `prompt` greedily by
    `sample_tokens` characters, joined by `prompt_separator`.
    """

    def __init__(self, text: TextDataset, train: Any, valid: Any, *, prompt: str = 'It is',
                 prompt_separator: str = '', sample_tokens: int = 50):
        self.text = text
        self.train, self.valid = train, valid
        # Validation in shares, one per part of an epoch, for the progress line
        self.valid_in_parts = True
        self.n_tokens = text.n_tokens
        self.prompt, self.prompt_separator, self.sample_tokens = prompt, prompt_separator, sample_tokens
        self.prompt_ids = text.text_to_i(prompt) if sample_tokens > 0 else None

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """
        `logits` `[seq_len, batch_size, n_tokens]`, `target` `[seq_len, batch_size]`: the mean cross entropy, the
        number of correct argmax predictions and the number of positions counted (all of them).
        """
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        correct = (logits.detach().argmax(dim=-1) == target).sum()
        return loss, correct, target.numel()

    def record(self) -> Dict[str, Any]:
        """What a checkpoint keeps of the data: the text's path and SHA-256, and the vocabulary."""
        return {'path': str(getattr(self.text, 'path', '')), 'sha256': getattr(self.text, 'sha256', ''),
                'itos': list(self.text.itos)}

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, device: torch.device,
               autocast: ContextManager) -> Optional[Tuple[str, str]]:
        """
        The prompt and its greedy continuation by the model's cached `generate()` (one step per new token, no
        prefix run again), or `None` when sampling is off.
        """
        if self.prompt_ids is None:
            return None
        prompt = self.prompt_ids.to(device)[:, None]
        with torch.random.fork_rng(devices=[]), autocast:
            tokens = model.generate(prompt, self.sample_tokens, temperature=0.0)[len(prompt):, 0].tolist()
        return self.prompt, self.prompt_separator + self.prompt_separator.join(self.text.itos[t] for t in tokens)
