"""
Helpers shared by the training tests: the Tiny Shakespeare file, a tiny configuration, and running the experiment's
command line (one process, or two under `torchrun`) in a subprocess, with its checkpoint read back.
"""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from labml_nn.experiments import checkpoint as ckpt

# The repository, and the text: `$TINY_SHAKESPEARE_PATH`, else the shared copy beside the repository
REPO = Path(__file__).resolve().parent.parent
TEXT = Path(os.environ.get('TINY_SHAKESPEARE_PATH', REPO.parent / 'shared' / 'data' / 'tiny_shakespeare.txt'))
# labml's colours in captured output
ANSI = re.compile(r'\x1b\[[0-9;]*m')

# A tiny model and short runs: a few seconds each on 2 cores
TINY = ['d_model=16', 'heads=2', 'd_ff=32', 'n_layers=1', 'seq_len=16', 'batch_size=8', 'epochs=1',
        'inner_iterations=2', 'valid_batches=2', 'sample_tokens=10', 'optimizer.optimizer=Adam',
        'optimizer.learning_rate=0.01', 'num_threads=1']


def _env(uuid: str, extra: Dict[str, str] = None) -> Dict[str, str]:
    return {**os.environ, 'TINY_SHAKESPEARE_PATH': str(TEXT), 'RUN_UUID': uuid,
            'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]), **(extra or {})}


def run_cli(cwd: Path, args: List[str], uuid: str = 'run', env: Dict[str, str] = None, **kwargs):
    """`python -m labml_nn.transformers.feedback.experiment *args` in `cwd`, as run `uuid`."""
    return subprocess.run([sys.executable, '-m', 'labml_nn.transformers.feedback.experiment', *args], cwd=cwd,
                          env=_env(uuid, env), capture_output=True, text=True, timeout=120, **kwargs)


def run_torchrun(cwd: Path, args: List[str], uuid: str):
    """The same under `torchrun --standalone --nproc_per_node 2` (gloo, one thread a process)."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               '-m', 'labml_nn.transformers.feedback.experiment', *args]
    return subprocess.run(command, cwd=cwd, env=_env(uuid, {'OMP_NUM_THREADS': '1'}), capture_output=True,
                          text=True, timeout=180)


def checkpoint_of(cwd: Path, model: str, uuid: str) -> dict:
    """The checkpoint of run `uuid` of `model` under `cwd`'s labml logs."""
    return ckpt.load_checkpoint(cwd / 'logs' / model / uuid / 'checkpoints' / ckpt.CHECKPOINT_NAME)


def expect_config_error(cwd: Path, monkeypatch, capsys, args: List[str], message: str) -> None:
    """The experiment's command line, in-process, stops on `args` with exit status 2 and `message`, starting nothing."""
    from labml_nn.transformers.feedback.experiment import main
    monkeypatch.chdir(cwd)
    monkeypatch.setenv('TINY_SHAKESPEARE_PATH', str(TEXT))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (cwd / 'logs').exists(), 'nothing is started for a bad configuration'
