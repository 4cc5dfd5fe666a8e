"""
---
title: Checkpoints that survive a crash
summary: What a checkpoint holds, saving it atomically in a labml run's folder, finding it again, and loading it
  into a model and an optimizer with a one-line error when they do not fit.
---

# Checkpoints

labml 0.5.3 has no checkpoint API, so the experiment writes its own with `torch.save` into
`<run folder>/checkpoints/checkpoint.pt`: the model, the optimizer with its schedule, the position in training,
the random number generator states, the configuration and the loss history.

## What a checkpoint holds

The model, the optimizer with its schedule, the position in training, every rank's random states, the
configuration, the loss history, the experiment's name, the precision's state (fp16's gradient scaler), every rank's
carried memory, and the **data**: the vocabulary (`itos`) and, for a text, the absolute path of the text and its
SHA-256. Resuming checks, before the run starts, that the checkpoint is of the same experiment, that its weights and
optimizer state fit the configuration, and that the text is the same file content (training on another text needs
`allow_text_change=true` and keeps the checkpoint's vocabulary). [The trainer](trainer.html) assembles the
checkpoint from the objects it owns.

## Written atomically

A checkpoint is written to a temporary file in the same folder, flushed to disk, and then renamed over the old
one. A rename within a folder is atomic, so a process killed mid-save leaves either the old checkpoint or the new
one, never a torn file; the temporary file such a kill leaves behind is removed by the next save. Only one process
writes a run's checkpoint (the main rank), so any temporary file of it found then is such a leftover.

Checkpoints hold only tensors and plain Python values, so they load with `torch.load(..., weights_only=True)`:
opening one never runs code from the file.
"""

import os
import random
import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from labml_nn.experiments.labml_adapter import checkpoint_folder

CHECKPOINT_NAME = 'checkpoint.pt'


def save_atomic(payload: Dict[str, Any], path: Path) -> None:
    """
    `torch.save(payload)` to `path` through a temporary file and a rename. Temporary files of `path` that a
    process killed mid-save left behind (`checkpoint.pt.<pid>.tmp`) are removed first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f'{path.name}.*.tmp'):
        if stale.name[len(path.name) + 1:-len('.tmp')].isdigit():
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # Make the rename itself durable
    if hasattr(os, 'O_DIRECTORY'):
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint onto the CPU; a clear error if it is missing or not one of ours."""
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from e
    missing = {'model', 'optimizer', 'progress', 'rng', 'config'} - set(payload)
    if missing:
        raise ValueError(f"{path} is not a training checkpoint of this experiment "
                         f"(missing {sorted(missing)})")
    return payload


def find_checkpoint(resume: str, experiments_path: Optional[Path], key: str = 'resume') -> Path:
    """
    The checkpoint that `resume=` (or config `key`) names: a checkpoint file, a run folder, or a run UUID looked
    up among labml's experiments (`<experiments>/<name>/<uuid>/checkpoints/checkpoint.pt`).
    """
    path = Path(resume).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / 'checkpoints' / CHECKPOINT_NAME, path / CHECKPOINT_NAME):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{key}={resume}: no {CHECKPOINT_NAME} in that folder or its checkpoints/")
    if experiments_path is not None and experiments_path.is_dir() and '/' not in resume:
        # A distributed run's rank-0 folder is `<uuid>.0`
        for run in (sorted(experiments_path.glob(f'*/{resume}'))
                    + sorted(experiments_path.glob(f'*/{resume}.0'))):
            candidate = run / 'checkpoints' / CHECKPOINT_NAME
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{key}={resume}: not a checkpoint file, a run folder, or the UUID of a run "
                            f"with a checkpoint under {experiments_path}")


def get_rng_state() -> Dict[str, Any]:
    """The states of the random number generators that training draws from (dropout, initialization)."""
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'python': random.getstate(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what `get_rng_state` returned."""
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    random.setstate(state['python'])


def first_mismatch(error: str) -> str:
    """The first line of PyTorch's list of tensors that do not fit a `load_state_dict`, and how many more."""
    head, *details = [line.strip() for line in error.splitlines() if line.strip()] or ['']
    if not details:
        return head
    first = details[0]
    size = re.match(r'size mismatch for (\S+): copying a param with shape '
                    r'torch.Size\((.*?)\) from checkpoint, '
                    r'the shape in current model is torch.Size\((.*?)\)', first)
    if size:
        first = f'{size[1]} is {size[2]} in the checkpoint and {size[3]} in this configuration'
    return first + (f' (and {len(details) - 1} more)' if len(details) > 1 else '')


def load_weights(model: torch.nn.Module, optimizer: Any, payload: Dict[str, Any], resume: str) -> None:
    """Load a checkpoint's model and optimizer; a one-line `ValueError` when they do not fit."""
    try:
        model.load_state_dict(payload['model'])
        optimizer.load_state_dict(payload['optimizer'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"resume={resume}: the checkpoint does not fit this configuration: "
                         f"{first_mismatch(str(e))}") from None


class RunCheckpoint:
    """
    The checkpoint file of the current labml run, `<run folder>/checkpoints/checkpoint.pt`: written atomically by
    the main rank, and described in words for messages (which step the last good one holds).
    """

    def __init__(self, is_main: bool = True):
        self.is_main = is_main
        # The step of the last checkpoint this run wrote (none yet)
        self.saved_step: Optional[int] = None

    @staticmethod
    def path() -> Optional[Path]:
        folder = checkpoint_folder()
        return None if folder is None else folder / CHECKPOINT_NAME

    def write(self, payload: Dict[str, Any], step: int) -> Optional[Path]:
        """Write `payload` (main rank) as the checkpoint of `step`; returns the file (`None` on other ranks)."""
        path = None
        if self.is_main:
            path = self.path()
            if path is None:
                raise RuntimeError("a checkpoint needs a labml experiment (experiment.create) to write into")
            save_atomic(payload, path)
        self.saved_step = step
        return path

    def describe(self) -> str:
        """Where the last good checkpoint of this run is, in words."""
        path = self.path()
        if path is None or not path.is_file() or self.saved_step is None:
            return "This run has written no checkpoint."
        return f"The last checkpoint is {path} (step {self.saved_step:,})."
