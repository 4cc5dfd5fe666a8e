"""
The training experiment: the command line end to end in subprocesses on tiny configs (smoke, resume, errors),
and its pieces in-process (batches, checkpoints, the schedule, argument parsing).
"""

from pathlib import Path

import pytest
import torch
from support import ANSI, TEXT, TINY, checkpoint_of, expect_config_error, run_cli

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.experiments.cli import parse_overrides
from labml_nn.experiments.optimizer import NoamFactor
from labml_nn.tasks.text import SequenceBatches, resolve_text_path
from labml_nn.transformers.feedback.experiment import Configs, main


@pytest.fixture(autouse=True)
def _need_text():
    if not TEXT.is_file():
        pytest.skip(f'Tiny Shakespeare not found at {TEXT}; set TINY_SHAKESPEARE_PATH')


@pytest.mark.slow
def test_cli_smoke(tmp_path):
    result = run_cli(tmp_path, ['model=feedback_transformer_kv', *TINY, 'train_steps=40'])
    assert result.returncode == 0, result.stderr[-3000:]
    out = ANSI.sub('', result.stdout)
    # A sample: the prompt followed by generated text, printed through labml's logger
    samples = [line.strip() for line in out.splitlines() if line.strip().startswith('It is')]
    assert samples and all(len(s) > len('It is') for s in samples), out[-2000:]
    assert 'Checkpoint: ' in out
    payload = checkpoint_of(tmp_path, 'feedback_transformer_kv', 'run')
    losses = [h['loss'] for h in payload['history']['train']]
    assert len(losses) == 40 and payload['progress']['step'] == 40
    # The loss goes down: from about ln(65) to well below
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert payload['config']['model'] == 'feedback_transformer_kv'
    assert payload['history']['valid'] and payload['history']['evaluations'], 'validation ran'


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    """Train 3 steps, stop, resume in a new process: steps 4 and 5 equal those of an uninterrupted run."""
    args = ['model=feedback_transformer', *TINY, 'dropout=0.1']
    first = run_cli(tmp_path, [*args, 'train_steps=3'], uuid='first')
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli(tmp_path, ['resume=first', 'train_steps=5'], uuid='resumed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_cli(tmp_path, [*args, 'train_steps=5'], uuid='straight')
    assert straight.returncode == 0, straight.stderr[-3000:]

    a = checkpoint_of(tmp_path, 'feedback_transformer', 'resumed')
    b = checkpoint_of(tmp_path, 'feedback_transformer', 'straight')
    loss_a = [h['loss'] for h in a['history']['train']]
    loss_b = [h['loss'] for h in b['history']['train']]
    assert len(loss_a) == len(loss_b) == 5
    assert loss_a[3:] == pytest.approx(loss_b[3:], abs=1e-6, rel=0)
    for key, value in b['model'].items():
        torch.testing.assert_close(a['model'][key], value, rtol=0, atol=1e-6)
    # The resumed run took its configuration from the checkpoint
    assert a['config']['dropout'] == 0.1 and a['config']['train_steps'] == 5


BAD_CONFIGS = [
    (['model=lstm'], "model='lstm' is not an option; choose one of feedback_transformer, feedback_transformer_kv"),
    (['seq_len=0'], 'seq_len must be an int >= 1, got 0'),
    (['seq_len=-3'], 'seq_len must be an int >= 1, got -3'),
    (['batch_size=ten'], "batch_size must be an int, got 'ten'"),
    (['no_such_key=1'], "Unknown config key 'no_such_key'"),
    (['device=cuda'], 'device cannot be set from the command line (it is computed)'),
    (['d_model=30', 'heads=4'], 'd_model=30 must be divisible by heads=4'),
    (['dropout=1.5'], 'dropout must be in [0, 1), got 1.5'),
    (['optimizer.optimizer=SGD'],
     "optimizer.optimizer='SGD' is not an option; choose one of Adam, Noam, AdamWarmup, AdamCosine"),
    (['resume=0123456789abcdef'], 'resume=0123456789abcdef: not a checkpoint file, a run folder, or the UUID'),
    # Found before the run starts (they used to crash it after the start)
    (['optimizer.learning_rate=-1'], 'optimizer.learning_rate must be a finite number > 0, got -1.0'),
    (['optimizer.learning_rate=inf'], 'optimizer.learning_rate must be a finite number > 0, got inf'),
    (['optimizer.eps=-1'], 'optimizer.eps must be a finite number >= 0, got -1.0'),
    (['optimizer.warmup=0'], 'optimizer.warmup must be an int >= 1 (steps of the Noam warm-up), got 0'),
    (['grad_norm_clip=nan'], 'grad_norm_clip must be a finite number >= 0 (0 turns clipping off), got nan'),
    (['text_path=/bin/ls'], 'text_path=/bin/ls is not UTF-8 text (byte 0x'),
    ([f'seed={2 ** 70}'], f'seed must be an int in [0, 4294967295], got {2 ** 70}'),
    (['seq_len=16', 'batch_size=8', 'inner_iterations=100000'], 'inner_iterations=100000 is more than the 7842 '
                                                                'training batches of an epoch'),
    (['text=tiny_shakespear'], "text='tiny_shakespear' is not an option; choose one of tiny_shakespeare"),
    (['train_loader=sequential'], "train_loader='sequential' is not an option; choose one of shuffled_train_loader"),
    (['checkpoint_every=-1'], 'checkpoint_every must be an int >= 0, got -1'),
    (['max_nonfinite_steps=0'], 'max_nonfinite_steps must be an int >= 1, got 0'),
    (['checkpoint_minutes=nan'], 'checkpoint_minutes must be a finite number >= 0 (0: off), got nan'),
]


@pytest.mark.parametrize('args, message', BAD_CONFIGS[:2])
def test_bad_config_values_cli(tmp_path, args, message):
    result = run_cli(tmp_path, args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / 'logs').exists(), 'nothing is started for a bad configuration'


@pytest.mark.parametrize('args, message', BAD_CONFIGS)
def test_bad_config_values(tmp_path, monkeypatch, capsys, args, message):
    expect_config_error(tmp_path, monkeypatch, capsys, args, message)


def test_missing_or_empty_data(tmp_path):
    missing = run_cli(tmp_path, ['model=transformer'], env={'TINY_SHAKESPEARE_PATH': str(tmp_path / 'nope.txt')})
    assert missing.returncode == 2
    assert 'Tiny Shakespeare file not found' in missing.stderr
    assert 'text_path=' in missing.stderr and 'TINY_SHAKESPEARE_PATH=' in missing.stderr
    (tmp_path / 'empty.txt').write_text('')
    empty = run_cli(tmp_path, [f'text_path={tmp_path / "empty.txt"}'])
    assert empty.returncode == 2 and 'is empty' in empty.stderr


@pytest.mark.parametrize('text, part, tokens', [('To be, or not to be', 'training text (its first 90%)', 17),
                                                ('x' * 300, 'validation text (its last 10%)', 30)])
def test_a_text_too_short_for_a_batch(tmp_path, monkeypatch, capsys, text, part, tokens):
    """Too short for one batch of training or of validation data: an error that names the file and the sizes."""
    path = tmp_path / 'short.txt'
    path.write_text(text)
    message = (f'text_path={path}: the {part} is too short: The text ({tokens} tokens) is too short for one batch '
               f'of batch_size=8 sequences of seq_len=16')
    test_bad_config_values(tmp_path, monkeypatch, capsys, [f'text_path={path}', 'seq_len=16', 'batch_size=8'], message)


def test_failed_download_says_how_to_provide_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv('TINY_SHAKESPEARE_PATH', raising=False)
    # Nothing listens on the discard port: the download fails at once, as it does offline
    with pytest.raises(RuntimeError, match='Could not download Tiny Shakespeare.*TINY_SHAKESPEARE_PATH'):
        resolve_text_path('', tmp_path, url='http://127.0.0.1:9/input.txt')
    assert list(tmp_path.iterdir()) == [], 'no partial file is left behind'


def test_local_file_is_used_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv('TINY_SHAKESPEARE_PATH', str(TEXT))
    assert resolve_text_path('', tmp_path, url='http://127.0.0.1:9/input.txt') == TEXT
    assert resolve_text_path(str(TEXT), None) == TEXT


def test_batches_shard_and_reproduce():
    data = torch.arange(1000)
    full = SequenceBatches(data, seq_len=10, batch_size=8, seed=3)
    shards = [SequenceBatches(data, seq_len=10, batch_size=8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(full) == 99 // 8
    for epoch in (0, 1):
        for idx in (0, 5, len(full) - 1):
            x, y = full.batch(epoch, idx)
            assert x.shape == (10, 8)
            # Targets are the inputs shifted by one token
            torch.testing.assert_close(x[1:], y[:-1])
            torch.testing.assert_close(y, x + 1)
            parts = [s.batch(epoch, idx) for s in shards]
            torch.testing.assert_close(torch.cat([p[0] for p in parts], dim=1), x)
    # Same (seed, epoch), same plan; another epoch, another order; every sequence once per epoch
    again = SequenceBatches(data, seq_len=10, batch_size=8, seed=3)
    torch.testing.assert_close(again.plan(1), full.plan(1))
    assert not torch.equal(full.plan(0), full.plan(1))
    plain = SequenceBatches(data, seq_len=10, batch_size=8, shuffle=False, random_offset=False)
    assert plain.plan(0).tolist() == list(range(0, 960, 10))
    offsets = full.plan(0) % 10
    assert len(set((full.plan(0) // 10).tolist())) == len(full.plan(0)) and offsets.max() < 10


def test_batches_errors():
    with pytest.raises(ValueError, match='multiple of the world size 2'):
        SequenceBatches(torch.arange(100), seq_len=4, batch_size=3, world_size=2)
    with pytest.raises(ValueError, match='too short'):
        SequenceBatches(torch.arange(20), seq_len=10, batch_size=4)


def test_checkpoint_survives_a_crash_mid_save(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoints' / 'checkpoint.pt'
    good = {'model': {'w': torch.ones(3)}, 'optimizer': {}, 'progress': {'step': 1}, 'rng': [], 'config': {}}
    ckpt.save_atomic(good, path)

    def crash(obj, f):
        f.write(b'partial garbage')
        raise KeyboardInterrupt('killed mid-save')

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({**good, 'progress': {'step': 2}}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)['progress'] == {'step': 1}
    assert [p.name for p in path.parent.iterdir()] == ['checkpoint.pt']
    path.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        ckpt.load_checkpoint(path)


def test_rng_state_round_trip():
    state = ckpt.get_rng_state()
    expected = torch.rand(3)
    ckpt.set_rng_state(state)
    torch.testing.assert_close(torch.rand(3), expected)


def test_noam_schedule():
    f = NoamFactor(d_model=128, warmup=2000)
    # Linear warm-up, peak at the warm-up step, then 1/sqrt(step)
    assert f(0) == pytest.approx(128 ** -0.5 * 2000 ** -1.5)
    assert f(1999) == pytest.approx(128 ** -0.5 * 2000 ** -0.5)
    assert f(7999) == pytest.approx(f(1999) / 2)
    assert f(999) < f(1999) > f(2999)


def test_parse_overrides_types():
    out = parse_overrides(Configs, ['seq_len=64', 'dropout=0.1', 'use_cuda=false', 'prompt=To be',
                                    'optimizer.learning_rate=1e-3', 'model=transformer'])
    assert out == {'seq_len': 64, 'dropout': 0.1, 'use_cuda': False, 'prompt': 'To be',
                   'optimizer.learning_rate': 1e-3, 'model': 'transformer'}
    with pytest.raises(ValueError, match='key=value'):
        parse_overrides(Configs, ['seq_len'])
    with pytest.raises(ValueError, match='use_cuda must be true or false'):
        parse_overrides(Configs, ['use_cuda=maybe'])


# ## Resuming: checked before the run starts

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A folder with a one-step `feedback_transformer_kv` run `kv` and a one-step `model=transformer` run `tr`."""
    if not TEXT.is_file():
        pytest.skip(f'Tiny Shakespeare not found at {TEXT}; set TINY_SHAKESPEARE_PATH')
    folder = tmp_path_factory.mktemp('runs')
    for uuid, model in (('kv', 'feedback_transformer_kv'), ('tr', 'transformer')):
        result = run_cli(folder, [f'model={model}', *TINY, 'train_steps=1'], uuid=uuid)
        assert result.returncode == 0, result.stderr[-3000:]
    return folder


def _other_text(folder: Path, same_characters: bool) -> Path:
    """Another text: a piece of Tiny Shakespeare (its characters), or one with characters it does not have."""
    path = folder / f'other_{same_characters}.txt'
    text = TEXT.read_text()[:200_000]
    path.write_text(text[::-1] if same_characters else text + '{}~#')
    return path


@pytest.mark.parametrize('args, message', [
    (['resume=kv', 'd_model=64'], 'resume=kv: the checkpoint does not fit this configuration: src_embed.weight is '
                                  '[65, 16] in the checkpoint and [65, 64] in this configuration (and '),
    (['resume=tr', 'model=feedback_transformer'], 'resume=tr: the checkpoint was trained as transformer; it cannot '
                                                  'continue as feedback_transformer'),
    (['resume=kv', 'optimizer.optimizer=Noam'], "resume=kv: the checkpoint does not fit this configuration: The "
                                                "checkpoint's optimizer schedule does not match optimizer.optimizer"),
    (['resume=kv', 'text_path={other_True}'], 'resume=kv: the checkpoint was trained on {text} (sha256 '),
    (['resume=kv', 'text_path={other_False}', 'allow_text_change=true'],
     "text_path={other_False} has 4 characters that are not in the checkpoint's vocabulary of 65: '#{{}}~'"),
])
def test_resume_errors_stop_before_the_run(runs, monkeypatch, capsys, args, message):
    monkeypatch.chdir(runs)
    monkeypatch.setenv('TINY_SHAKESPEARE_PATH', str(TEXT))
    names = {f'other_{same}': _other_text(runs, same) for same in (True, False)}
    args = [a.format(**names) for a in args]
    before = sorted(p.name for p in (runs / 'logs').glob('*/*'))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('error: ') and message.format(text=TEXT, **names) in err[-1], err[-1]
    assert sorted(p.name for p in (runs / 'logs').glob('*/*')) == before, 'no run was started'


@pytest.mark.slow
def test_resume_on_another_text_when_asked(runs):
    """`allow_text_change=true` continues on the new text with the checkpoint's vocabulary, and records the text."""
    other = _other_text(runs, True)
    result = run_cli(runs, ['resume=kv', f'text_path={other}', 'allow_text_change=true', 'train_steps=2'],
                     uuid='kv_other')
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (checkpoint_of(runs, 'feedback_transformer_kv', u) for u in ('kv', 'kv_other'))
    assert second['data']['itos'] == first['data']['itos'] and second['data']['path'] == str(other)
    assert second['data']['sha256'] != first['data']['sha256'] and second['progress']['step'] == 2
    # The key is not inherited: resuming the new run on yet another text is refused again
    assert 'allow_text_change' not in second['config']


def test_checkpoint_records_its_data(runs):
    import hashlib
    payload = checkpoint_of(runs, 'feedback_transformer_kv', 'kv')
    text = TEXT.read_text()
    assert payload['data'] == {'path': str(TEXT.absolute()), 'sha256': hashlib.sha256(TEXT.read_bytes()).hexdigest(),
                               'itos': sorted(set(text))}
    assert payload['experiment'] == 'feedback_transformer_kv'
