"""
A training run never loses work or saves garbage: non-finite steps are skipped and end a diverged run, checkpoints
are written periodically and on SIGINT / SIGTERM (and resume exactly from there), a checkpoint never holds a
non-finite weight, and the ranks of a data-parallel run take every one of these decisions together.
"""

import os
import re
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest
import torch
from labml import monit
from support import ANSI, REPO, TEXT, TINY, checkpoint_of, run_cli

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.experiments.distributed import DistributedContext
from labml_nn.experiments.labml_adapter import set_values
from labml_nn.experiments.run_control import TrainingDiverged
from labml_nn.experiments.trainer import Trainer
from labml_nn.transformers.feedback.experiment import Configs

pytestmark = pytest.mark.skipif(not TEXT.is_file(), reason=f'Tiny Shakespeare not found at {TEXT}')

SMALL = {'d_model': 16, 'heads': 2, 'd_ff': 32, 'n_layers': 1, 'seq_len': 16, 'batch_size': 4, 'epochs': 1,
         'sample_tokens': 0, 'text_path': str(TEXT), 'use_cuda': False, 'model': 'feedback_transformer_kv',
         'optimizer.optimizer': 'Noam', 'optimizer.learning_rate': 1.0, 'optimizer.warmup': 10,
         'checkpoint_minutes': 0.0}


def _trainer(dist: Optional[DistributedContext] = None, **values) -> Trainer:
    conf = Configs()
    conf._dist = dist or DistributedContext()
    set_values(conf, {**SMALL, **values})
    return conf.trainer


def _train(trainer: Trainer, end: int):
    """`train_part` up to batch `end` of epoch 0 (labml's partial sections need a loop around them)."""
    for _ in monit.loop(range(1)):
        return trainer.train_part(0, end)


def _nan_at(trainer: Trainer, steps) -> Trainer:
    """Make the task's loss NaN at the given (0-based) steps; it is the model's otherwise."""
    real = trainer.task.loss

    def loss(logits, target):
        value, correct, count = real(logits, target)
        if trainer.progress['step'] in steps:
            value = value * float('nan')
        return value, correct, count
    trainer.task.loss = loss
    return trainer


def _params(trainer: Trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


# ## Non-finite steps

def test_a_non_finite_step_is_skipped_and_counted(capsys):
    trainer = _nan_at(_trainer(train_steps=4), {1, 2})
    scheduler = trainer.optimizer.scheduler
    for step in range(4):
        before, lr_steps = _params(trainer), scheduler.last_epoch
        _train(trainer, step + 1)
        skipped = step in (1, 2)
        # No optimizer step and no schedule step on a skipped step; both on a good one
        assert all(torch.equal(a, b) for a, b in zip(before, _params(trainer))) == skipped
        assert scheduler.last_epoch == lr_steps + (not skipped)
    assert trainer.progress['skipped_steps'] == 2 and trainer.control.nonfinite_in_a_row == 0
    out = ANSI.sub('', capsys.readouterr().out)
    assert 'Step 2: non-finite loss or gradient norm; optimizer step skipped (1 in a row, 1 in all)' in out
    assert 'Step 3: non-finite loss or gradient norm; optimizer step skipped (2 in a row, 2 in all)' in out


def test_a_non_finite_step_under_fp16_is_skipped_and_training_goes_on():
    """The gradient scaler has unscaled the skipped step's gradients: the next step must be able to unscale."""
    trainer = _nan_at(_trainer(train_steps=4, precision='fp16'), {1})
    scale = trainer.precision.scaler.get_scale()
    for step in range(4):
        before = _params(trainer)
        _train(trainer, step + 1)
        changed = not all(torch.equal(a, b) for a, b in zip(before, _params(trainer)))
        assert changed == (step != 1), step
    assert trainer.progress['step'] == 4 and trainer.progress['skipped_steps'] == 1
    # The scaler saw the overflow of the skipped step
    assert trainer.precision.scaler.get_scale() < scale


def test_too_many_non_finite_steps_in_a_row_stop_the_run():
    trainer = _nan_at(_trainer(max_nonfinite_steps=3), {0, 2, 3, 4})
    with pytest.raises(TrainingDiverged, match=r'training diverged: 3 consecutive steps \(steps 3 to 5\) had a '
                                               r'non-finite loss or gradient norm \(max_nonfinite_steps=3\)'):
        _train(trainer, 10)
    assert trainer.progress['step'] == 5 and trainer.progress['skipped_steps'] == 4


def test_a_checkpoint_with_a_non_finite_weight_is_never_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckpt, 'checkpoint_folder', lambda: tmp_path)
    trainer = _trainer(train_steps=2)
    _train(trainer, 1)
    assert trainer.save_checkpoint()
    good = ckpt.load_checkpoint(tmp_path / ckpt.CHECKPOINT_NAME)
    with torch.no_grad():
        trainer.model.generator.bias[3] = float('inf')
    assert not trainer.save_checkpoint()
    kept = ckpt.load_checkpoint(tmp_path / ckpt.CHECKPOINT_NAME)
    assert all(torch.equal(kept['model'][k], v) for k, v in good['model'].items())
    assert 'Checkpoint not written: a weight is not finite. The last checkpoint is' in \
        ANSI.sub('', capsys.readouterr().out)


@pytest.mark.slow
def test_a_diverging_run_stops_with_status_3_and_keeps_its_last_good_checkpoint(tmp_path):
    """Adam at a learning rate of 10^6: NaN from the second step on."""
    args = ['model=feedback_transformer_kv', *TINY, 'optimizer.learning_rate=1e6', 'train_steps=40',
            'checkpoint_every=1', 'max_nonfinite_steps=4']
    result = run_cli(tmp_path, args, uuid='diverged')
    assert result.returncode == 3, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r'error: training diverged: 4 consecutive steps \(steps 2 to 5\) had a non-finite loss or '
                        r'gradient norm \(max_nonfinite_steps=4\); their optimizer steps were skipped\. The last '
                        r'checkpoint is .*checkpoint\.pt \(step 1\)\.', error), error
    payload = checkpoint_of(tmp_path, 'feedback_transformer_kv', 'diverged')
    assert payload['progress']['step'] == 1
    assert all(torch.isfinite(v).all() for v in payload['model'].values())


# ## Periodic checkpoints

def test_checkpoints_every_n_steps_and_by_the_clock(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, 'checkpoint_folder', lambda: tmp_path)
    saved = []
    monkeypatch.setattr(ckpt, 'save_atomic', lambda payload, path: saved.append(payload['progress']['step']))
    trainer = _trainer(checkpoint_every=4, train_steps=8)
    _train(trainer, 100)
    # Not at step 8: the end of the run writes its own after validating
    assert saved == [4]
    trainer = _trainer(checkpoint_minutes=5.0, train_steps=8)
    _train(trainer, 2)
    # Five minutes later by rank 0's clock
    trainer.control.last_save -= 301
    _train(trainer, 4)
    assert saved == [4, 3]


def test_a_temporary_file_left_by_a_kill_mid_save_is_removed(tmp_path):
    path = tmp_path / ckpt.CHECKPOINT_NAME
    (tmp_path / f'{ckpt.CHECKPOINT_NAME}.12345.tmp').write_bytes(b'torn')
    (tmp_path / 'notes.12345.tmp').write_bytes(b'not ours')
    ckpt.save_atomic({'model': {}, 'optimizer': {}, 'progress': {}, 'rng': [], 'config': {}}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.CHECKPOINT_NAME, 'notes.12345.tmp']


# ## SIGINT and SIGTERM

def _start(cwd, args, uuid):
    env = {**os.environ, 'TINY_SHAKESPEARE_PATH': str(TEXT), 'RUN_UUID': uuid,
           'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])}
    return subprocess.Popen([sys.executable, '-m', 'labml_nn.transformers.feedback.experiment', *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop_after_first_checkpoint(cwd, args, uuid, signum):
    """Start a run, send `signum` once its first periodic checkpoint exists, and wait for it to end."""
    process = _start(cwd, args, uuid)
    path = cwd / 'logs' / 'feedback_transformer' / uuid / 'checkpoints' / ckpt.CHECKPOINT_NAME
    deadline = time.monotonic() + 120
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    return process.returncode, ANSI.sub('', out), err


def _check_stopped(tmp_path, code, out, err, signum, status) -> int:
    """The stopped run's exit status, message and checkpoint; returns the step it stopped at."""
    assert code == status, err[-3000:]
    assert 'Traceback' not in err
    stopped = checkpoint_of(tmp_path, 'feedback_transformer', 'stopped')
    step = stopped['progress']['step']
    assert 2 <= step < 400 and stopped['progress']['batch'] == step
    assert f'Stopped by {signal.Signals(signum).name} at step {step}.' in out
    assert 'Resume with: python -m labml_nn.transformers.feedback.experiment resume=stopped' in out
    run_log = (tmp_path / 'logs' / 'feedback_transformer' / 'stopped' / 'run_log.jsonl').read_text()
    assert '"status": "interrupted"' in run_log
    return step


@pytest.mark.slow
def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resume_is_exact(tmp_path):
    """Stop mid-epoch by SIGTERM, resume in a new process: the next steps equal an uninterrupted run's."""
    args = ['model=feedback_transformer', *TINY, 'dropout=0.1', 'checkpoint_every=2']
    code, out, err = _stop_after_first_checkpoint(tmp_path, [*args, 'train_steps=400'], 'stopped', signal.SIGTERM)
    step = _check_stopped(tmp_path, code, out, err, signal.SIGTERM, 143)

    resumed = run_cli(tmp_path, ['resume=stopped', f'train_steps={step + 2}'], uuid='resumed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_cli(tmp_path, [*args, f'train_steps={step + 2}'], uuid='straight')
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = checkpoint_of(tmp_path, 'feedback_transformer', 'resumed')
    b = checkpoint_of(tmp_path, 'feedback_transformer', 'straight')
    loss_a = [h['loss'] for h in a['history']['train']]
    loss_b = [h['loss'] for h in b['history']['train']]
    assert len(loss_a) == len(loss_b) == step + 2
    assert loss_a[step:] == pytest.approx(loss_b[step:], abs=1e-6, rel=0)
    for key, value in b['model'].items():
        torch.testing.assert_close(a['model'][key], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_sigint_stops_a_carried_memory_run_with_its_memory_in_the_checkpoint(tmp_path):
    """
    Ctrl-C: status 130, and the checkpoint holds the carried memory of that step (resuming from a mid-epoch
    checkpoint with carried memory is exact: `test_accelerators.py::test_carry_memory_resume_continues_exactly`).
    """
    args = ['model=feedback_transformer', *TINY, 'carry_memory=true', 'memory_span=12', 'checkpoint_every=2',
            'train_steps=400']
    code, out, err = _stop_after_first_checkpoint(tmp_path, args, 'stopped', signal.SIGINT)
    step = _check_stopped(tmp_path, code, out, err, signal.SIGINT, 130)
    carried = checkpoint_of(tmp_path, 'feedback_transformer', 'stopped')['carried'][0]
    assert carried['n_steps'] == step * 16


# ## Data-parallel ranks decide together

def _agreement_worker(rank: int):
    trainer = _trainer(DistributedContext(rank, 2, 0), batch_size=4)
    real = trainer.task.loss

    def loss(logits, target):
        value, correct, count = real(logits, target)
        step = trainer.progress['step']
        # Only rank 1 sees a NaN loss (at step 1), and only rank 1 is told to stop (at step 3)
        if rank == 1 and step == 1:
            value = value * float('nan')
        if rank == 1 and step == 3:
            trainer.control.signals.received = signal.SIGTERM
        return value, correct, count

    trainer.task.loss = loss
    before = _params(trainer)
    _train(trainer, 2)
    after_skip = _params(trainer)
    reason = _train(trainer, 100)
    return {'reason': reason, 'step': trainer.progress['step'], 'skipped': trainer.progress['skipped_steps'],
            'moved_at_step_0': not all(torch.equal(a, b) for a, b in zip(before, after_skip)),
            'params': _params(trainer)}


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason='needs torch.distributed')
def test_ranks_skip_and_stop_together(tmp_path):
    from test_distributed import run_on_two_ranks
    rank0, rank1 = run_on_two_ranks(tmp_path, _agreement_worker)
    for r in (rank0, rank1):
        # Step 1 skipped by both (rank 1's NaN), both stop after step 4 (rank 1's signal)
        assert r['reason'] == 'signal' and r['step'] == 4 and r['skipped'] == 1 and r['moved_at_step_0']
    for a, b in zip(rank0['params'], rank1['params']):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ## A failure after the run started: one line

# The experiment's command line with `torch.save` failing (a full disk) from its second call on, after writing part
# of the file, as a disk that fills up mid-save does
_FULL_DISK = '''
import runpy, sys, torch
real, calls = torch.save, []

def save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) >= 2:
        f.write(b'part of a checkpoint')
        raise OSError(28, 'No space left on device')
    return real(obj, f, *args, **kwargs)

torch.save = save
sys.argv = ['experiment', *sys.argv[1:]]
runpy.run_module('labml_nn.transformers.feedback.experiment', run_name='__main__', alter_sys=True)
'''


def test_a_failed_save_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    args = ['model=feedback_transformer_kv', *TINY, 'checkpoint_every=2', 'train_steps=6']
    env = {**os.environ, 'TINY_SHAKESPEARE_PATH': str(TEXT), 'RUN_UUID': 'full',
           'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])}
    result = subprocess.run([sys.executable, '-c', _FULL_DISK, *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    # Its own exit status (not a bad configuration's 2), no traceback, one line naming the cause and what is intact
    assert result.returncode == 4, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr and 'Traceback' not in result.stdout
    run = tmp_path / 'logs' / 'feedback_transformer_kv' / 'full'
    line = result.stderr.strip().splitlines()[-1]
    assert line == (f"error: the run failed at step 4: OSError: [Errno 28] No space left on device (the traceback "
                    f"is in {run / 'error.log'}). The last checkpoint is {run / 'checkpoints' / 'checkpoint.pt'} "
                    f"(step 2). Resume with: python -m labml_nn.transformers.feedback.experiment resume=full"), line
    # The step-2 checkpoint is intact and alone; the traceback is in the run's folder
    assert checkpoint_of(tmp_path, 'feedback_transformer_kv', 'full')['progress']['step'] == 2
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['checkpoint.pt']
    assert 'OSError: [Errno 28] No space left on device' in (run / 'error.log').read_text()
