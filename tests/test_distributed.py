"""
Data-parallel training under torchrun on CPU (gloo): two processes with batch b each must train exactly like one
process with batch 2b, keep identical parameters, and resume like a single process.
"""

import os
import subprocess
import sys

import pytest
import torch
from test_experiment import REPO, TEXT, TINY, checkpoint_of, run_cli

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not TEXT.is_file(),
                                reason='needs torch.distributed and the Tiny Shakespeare file')

# Dropout off, so one process and two see exactly the same computation
ARGS = [*TINY, 'dropout=0.0', 'batch_size=8']


def run_torchrun(cwd, args, uuid):
    env = {**os.environ, 'TINY_SHAKESPEARE_PATH': str(TEXT), 'RUN_UUID': uuid, 'OMP_NUM_THREADS': '1',
           'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])}
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               '-m', 'labml_nn.transformers.feedback.experiment', *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def losses(payload):
    return [h['loss'] for h in payload['history']['train']]


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_double_batch(tmp_path):
    model = 'feedback_transformer_kv'
    ddp = run_torchrun(tmp_path, [f'model={model}', *ARGS, 'train_steps=3'], uuid='ddp')
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_cli(tmp_path, [f'model={model}', *ARGS, 'train_steps=3'], uuid='single')
    assert single.returncode == 0, single.stderr[-3000:]

    # Rank 0 writes the checkpoint, into labml's distributed run folder `<uuid>.0`
    a = checkpoint_of(tmp_path, model, 'ddp.0')
    b = checkpoint_of(tmp_path, model, 'single')
    assert not (tmp_path / 'logs' / model / 'ddp.1' / 'checkpoints').exists(), 'only rank 0 writes checkpoints'
    # All ranks hold the same parameters (checked across ranks when the checkpoint is written)
    assert a['progress']['replica_difference'] == 0.0
    # 2 ranks x 4 rows == 1 process x 8 rows: the same loss, step after step, and the same parameters
    assert losses(a) == pytest.approx(losses(b), abs=1e-5, rel=0)
    for key, value in b['model'].items():
        torch.testing.assert_close(a['model'][key], value, rtol=0, atol=1e-5)
    assert len(a['rng']) == 2, 'every rank saved its random state'
    # Only rank 0 prints samples and progress
    assert ddp.stdout.count('Trained ') == 1


@pytest.mark.slow
def test_resume_under_torchrun(tmp_path):
    model = 'feedback_transformer'
    args = [f'model={model}', *ARGS, 'dropout=0.1']
    first = run_torchrun(tmp_path, [*args, 'train_steps=2'], uuid='first')
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_torchrun(tmp_path, ['resume=first', 'train_steps=3'], uuid='resumed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_torchrun(tmp_path, [*args, 'train_steps=3'], uuid='straight')
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = checkpoint_of(tmp_path, model, 'resumed.0')
    b = checkpoint_of(tmp_path, model, 'straight.0')
    assert losses(a)[2] == pytest.approx(losses(b)[2], abs=1e-6, rel=0)
    assert a['progress']['replica_difference'] == 0.0
