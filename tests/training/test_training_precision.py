"""
`precision=bf16|fp16` in the training experiment: a short run's losses fall like float32's, checkpoints keep float32
weights and resume exactly, fp16 uses a gradient scaler, and a bad value is a clear error.
"""

import pytest
import torch
from support import TINY, checkpoint_of, run_cli

from labml_nn.experiments.precision import PRECISIONS, Precision

ARGS = ['model=feedback_transformer_kv', *[a for a in TINY if not a.startswith('sample_tokens')], 'sample_tokens=5',
        'dropout=0.1']


def _losses(payload):
    return [h['loss'] for h in payload['history']['train']]


@pytest.mark.slow
def test_bf16_training_follows_fp32_and_resumes_exactly(tmp_path):
    for precision in ('fp32', 'bf16'):
        result = run_cli(tmp_path, [*ARGS, f'precision={precision}', 'train_steps=30'], uuid=precision)
        assert result.returncode == 0, result.stderr[-3000:]
    fp32, bf16 = (checkpoint_of(tmp_path, 'feedback_transformer_kv', p) for p in ('fp32', 'bf16'))
    a, b = _losses(fp32), _losses(bf16)
    # The loss falls the same way: the first steps agree to bf16's precision, the last ten are as low on average
    assert a[0] == pytest.approx(b[0], rel=1e-2)
    assert sum(b[-10:]) / 10 < a[0] - 0.5 and sum(b[-10:]) == pytest.approx(sum(a[-10:]), rel=0.03)
    # Checkpoints hold float32 weights whatever the precision, and record it
    assert all(v.dtype == torch.float32 for v in bf16['model'].values() if v.is_floating_point())
    assert bf16['precision']['precision'] == 'bf16' and bf16['config']['precision'] == 'bf16'
    # Stop after 3 steps and resume: steps 4 and 5 are those of an uninterrupted bf16 run
    args = [*ARGS, 'precision=bf16']
    assert run_cli(tmp_path, [*args, 'train_steps=3'], uuid='first').returncode == 0
    resumed = run_cli(tmp_path, ['resume=first', 'train_steps=5'], uuid='resumed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = _losses(checkpoint_of(tmp_path, 'feedback_transformer_kv', 'bf16'))[:5]
    assert _losses(checkpoint_of(tmp_path, 'feedback_transformer_kv', 'resumed'))[3:] == \
        pytest.approx(straight[3:], abs=1e-6, rel=0)


@pytest.mark.slow
def test_fp16_runs_with_a_gradient_scaler(tmp_path):
    result = run_cli(tmp_path, [*ARGS, 'precision=fp16', 'train_steps=6'], uuid='fp16')
    assert result.returncode == 0, result.stderr[-3000:]
    payload = checkpoint_of(tmp_path, 'feedback_transformer_kv', 'fp16')
    scaler = payload['precision']['scaler']
    assert scaler is not None and scaler['scale'] > 0
    assert all(torch.isfinite(torch.tensor(_losses(payload))))


def test_bad_precision_is_a_clear_error(tmp_path):
    result = run_cli(tmp_path, [*ARGS, 'precision=fp8'])
    assert result.returncode == 2
    assert 'error: precision must be one of fp32, bf16, fp16, got' in result.stderr


def test_scaler_skips_overflowing_steps_without_moving_the_schedule():
    # A scaled step whose gradient overflows is skipped (weights and schedule unchanged), the next one is taken
    from labml_nn.experiments.optimizer import NoamFactor, ScheduledOptimizer
    precision = Precision('fp16', torch.device('cpu'))
    w = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([w], lr=0.1)
    scheduled = ScheduledOptimizer(adam, torch.optim.lr_scheduler.LambdaLR(adam, NoamFactor(4, 10)))
    precision.backward((w * torch.tensor([float('inf'), 1.0, 1.0])).sum(), adam)
    precision.step(scheduled)
    assert torch.equal(w.detach(), torch.ones(3)) and scheduled.scheduler.last_epoch == 0
    w.grad = None
    precision.backward((w * 2.0).sum(), adam)
    precision.step(scheduled)
    assert not torch.equal(w.detach(), torch.ones(3)) and scheduled.scheduler.last_epoch == 1
    assert set(PRECISIONS) == {'fp32', 'bf16', 'fp16'}
