"""
Runs of the experiment scripts (`accelerators.py`, `compare_models.py`, `state_tracking.py`): one training run in
its own process, read back from its checkpoint, and the commit the results belong to.
"""

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch


def commit() -> str:
    """The repository's short commit hash, or `unknown` outside a git checkout."""
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip() or 'unknown'


def run_and_load(module: str, args: List[str], name: str, uuid: str, log: Optional[Path] = None,
                 env: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, Any], float]:
    """
    `python -m <module> *args` as run `uuid` of experiment `name` (its output to the file `log`, or dropped), and
    the checkpoint it leaves in `logs/<name>/<uuid>/`; returns the checkpoint and the run's wall time in seconds.
    """
    command = [sys.executable, '-m', module, *args]
    print(' '.join(command[1:]), flush=True)
    start = time.perf_counter()
    run_env = {**os.environ, 'RUN_UUID': uuid, **(env or {})}
    if log is None:
        subprocess.run(command, check=True, env=run_env, stdout=subprocess.DEVNULL)
    else:
        with open(log, 'w') as out:
            subprocess.run(command, check=True, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    path = Path('logs') / name / uuid / 'checkpoints' / 'checkpoint.pt'
    return torch.load(path, map_location='cpu', weights_only=True), wall
