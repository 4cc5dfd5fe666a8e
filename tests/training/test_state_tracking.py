"""
The state-tracking task: programs against an independent interpreter, the grammar's rules, determinism, disjoint
splits, streams, the masked loss, and the experiment end to end on a tiny configuration.
"""

import json
import os
import random
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from support import REPO

from labml_nn.experiments.labml_adapter import config_default, config_options, set_values
from labml_nn.experiments.trainer import Trainer
from labml_nn.tasks.programs import (
    Program,
    ProgramSpec,
    ProgramSplits,
    encode_stream,
    generate_program,
    generate_programs,
    print_facts,
    vocabulary,
)
from labml_nn.tasks.state_tracking import (
    NO_LABEL_ID,
    Breakdown,
    held_out_streams,
    masked_loss,
    parse_train_statements,
    training_streams,
)
from labml_nn.transformers.causal import CausalState
from labml_nn.transformers.feedback.state_tracking import StateTrackingConfigs

# ## An independent interpreter

def interpret(words: List[str], spec: ProgramSpec) -> Tuple[List[str], Dict[str, int]]:
    """
    Run a stream of programs word by word and check the grammar's rules on the way; return the label of every
    word (the printed value at the `;` of a print, else `_`) and counts of what it saw.
    """
    lo, hi = spec.min_value, spec.max_value
    labels: List[str] = []
    seen = {'statements': 0, 'if': 0, 'applied': 0, 'skipped': 0, 'print': 0, 'programs': 0}
    env: Dict[str, int] = {}
    i = 0

    def number(word: str) -> int:
        assert word.lstrip('-').isdigit(), word
        value = int(word)
        assert lo <= value <= hi, f'value {value} out of range'
        return value

    def simple(at: int, apply: bool) -> int:
        """Run `v = n ;`, `v ++ ;` or `v -- ;` starting at word `at` (on a copy unless `apply`); the next index."""
        name, op = words[at], words[at + 1]
        assert name in spec.names, name
        target = env if apply else dict(env)
        if op == '=':
            assert name not in target, f'= on {name}, which already has a value'
            target[name] = number(words[at + 2])
            assert words[at + 3] == ';'
            labels.extend(['_'] * 4)
            return at + 4
        assert op in ('++', '--'), f'{op} cannot start a statement here (no print or if inside an if)'
        assert name in target, f'{op} on {name}, which has no value'
        target[name] += 1 if op == '++' else -1
        assert lo <= target[name] <= hi, f'{name} left the range'
        assert words[at + 2] == ';'
        labels.extend(['_'] * 3)
        return at + 3

    while i < len(words):
        word = words[i]
        if word == 'END':
            labels.append('_')
            env = {}
            seen['programs'] += 1
            i += 1
            continue
        seen['statements'] += 1
        if word == 'print':
            name = words[i + 1]
            assert words[i + 2] == ';'
            labels.extend(['_', '_', str(env[name])])
            seen['print'] += 1
            i += 3
        elif word == 'if':
            name, op, bound, colon = words[i + 1:i + 5]
            assert colon == ':' and op in ('<', '>') and name in env
            value = env[bound] if bound in spec.names else number(bound)
            holds = env[name] < value if op == '<' else env[name] > value
            labels.extend(['_'] * 5)
            seen['if'] += 1
            seen['applied' if holds else 'skipped'] += 1
            i = simple(i + 5, holds)
        else:
            i = simple(i, True)
    return labels, seen


@pytest.mark.parametrize('spec', [ProgramSpec(), ProgramSpec(2, 30), ProgramSpec(5, 60, 0, 4),
                                  ProgramSpec(1, 20, 3, 5)])
def test_labels_equal_an_independent_interpreter(spec):
    programs = generate_programs(spec, 40, 'interpreter')
    words = [w for p in programs for w in p.tokens]
    labels, seen = interpret(words, spec)
    assert labels == [w for p in programs for w in p.labels]
    assert seen['programs'] == 40 and seen['statements'] == 40 * spec.statements
    # Every kind of statement occurs, and both outcomes of an `if`
    assert seen['print'] > 0 and seen['applied'] > 0 and seen['skipped'] > 0
    assert all(p.tokens[-1] == 'END' and p.tokens.count('END') == 1 for p in programs)
    # A program's first statement can only be an assignment
    assert all(p.tokens[1] == '=' for p in programs)


def test_grammar_uses_every_statement_form():
    programs = generate_programs(ProgramSpec(3, 100), 20, 'forms')
    text = ' '.join(' '.join(p.tokens) for p in programs)
    for form in (' = ', ' ++ ;', ' -- ;', 'print ', ' < ', ' > ', ': x = ', ': y ++ ;'):
        assert form in text, form
    # Comparisons with a variable and with a value
    words = text.split()
    bounds = [words[i + 3] for i, w in enumerate(words) if w == 'if']
    assert any(b in 'xyz' for b in bounds) and any(b.isdigit() for b in bounds)


def test_interpreter_catches_broken_programs():
    spec = ProgramSpec(2, 5)
    for broken in (['x', '=', '3', ';', 'x', '=', '4', ';'],                      # = on an assigned variable
                   ['x', '=', '10', ';', 'x', '++', ';'],                         # out of range
                   ['x', '=', '3', ';', 'if', 'x', '<', '5', ':', 'print', 'x', ';'],   # print inside if
                   ['y', '++', ';']):                                             # no value yet
        with pytest.raises((AssertionError, KeyError)):
            interpret(broken, spec)


def test_deterministic_and_seeded():
    spec = ProgramSpec(3, 30)
    assert generate_programs(spec, 5, 'a') == generate_programs(spec, 5, 'a')
    assert generate_programs(spec, 5, 'a') != generate_programs(spec, 5, 'b')
    assert generate_program(random.Random(3), spec) == generate_program(random.Random(3), spec)
    # The same in a fresh interpreter (string seeds do not depend on PYTHONHASHSEED)
    code = ("from labml_nn.tasks.programs import *; "
            "print(' '.join(generate_programs(ProgramSpec(3, 30), 1, 'a')[0].tokens))")
    fresh = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                           env={'PYTHONHASHSEED': '123', 'PATH': ''}, check=True).stdout.strip()
    assert fresh == ' '.join(generate_programs(spec, 1, 'a')[0].tokens)


def test_splits_are_disjoint():
    # Short programs over few values: many draws repeat, so the exclusion really has work to do
    spec = ProgramSpec(1, 2, 1, 3)
    splits = ProgramSplits(spec, seed=0, valid_programs=20, test_programs=20)
    test = {p.tokens for p in splits.test}
    valid = {p.tokens for p in splits.valid}
    train = {p.tokens for p in splits.train(200, 'e0')}
    assert not test & valid and not train & (test | valid)
    assert len(train) > 1
    # Only a handful of distinct programs exist: asking for training programs when all are held out fails clearly
    with pytest.raises(ValueError, match='too few distinct programs'):
        ProgramSplits(ProgramSpec(1, 1, 1, 2), seed=0, valid_programs=50, test_programs=50)


def test_vocabulary_is_fixed_by_the_grammar():
    vocab = vocabulary(ProgramSpec(3, 10))
    assert vocab[NO_LABEL_ID] == '_' and len(vocab) == len(set(vocab))
    assert vocab == vocabulary(ProgramSpec(3, 99))
    assert set('x y z 1 10 print if END'.split()) <= set(vocab) and 'p' not in vocab
    assert len(vocabulary(ProgramSpec(5, 10, 0, 20))) == len(vocab) + 2 + 11


@pytest.mark.parametrize('kwargs, message', [({'variables': 0}, 'variables'), ({'variables': 9}, 'variables'),
                                             ({'statements': 0}, 'statements'),
                                             ({'min_value': 5, 'max_value': 5}, 'min_value < max_value')])
def test_spec_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProgramSpec(**kwargs)


# ## Streams

def test_held_out_streams_hold_whole_programs():
    spec = ProgramSpec(2, 12)
    vocab = vocabulary(spec)
    programs = generate_programs(spec, 9, 'h')
    streams = held_out_streams(programs, vocab, n_streams=4, seq_len=16)
    assert streams.streams.shape[1] % 16 == 0
    end = vocab.index('END')
    found = []
    for row, labels in zip(streams.streams.tolist(), streams.labels.tolist()):
        # Every row: whole programs, then END padding with label `_`
        words = [vocab[t] for t in row]
        while words and words[-1] == 'END' and (len(words) < 2 or words[-2] == 'END'):
            words.pop()
        text = ' '.join(words)
        found += [p for p in programs if ' '.join(p.tokens) in text]
        assert all(lab == NO_LABEL_ID for t, lab in zip(row[len(words):], labels[len(words):]) if t == end)
    assert sorted(found, key=programs.index) == programs
    # Batches are consecutive segments of every stream
    x0, y0 = streams.batch(0, 0)
    x1, _ = streams.batch(0, 1)
    assert x0.shape == (16, 4)
    torch.testing.assert_close(torch.cat([x0, x1]).t(), streams.streams[:, :32])
    torch.testing.assert_close(y0.t(), streams.labels[:, :16])


def test_training_streams_deterministic_and_fresh_each_epoch():
    spec = ProgramSpec(3, 20)
    splits = ProgramSplits(spec, seed=1, valid_programs=4, test_programs=4)
    vocab = vocabulary(spec)
    a = training_streams(splits, 20, vocab, 0, range(3), n_segments=5, seq_len=16)
    b = training_streams(splits, 20, vocab, 0, range(3), n_segments=5, seq_len=16)
    c = training_streams(splits, 20, vocab, 1, range(3), n_segments=5, seq_len=16)
    assert a.streams.shape == (3, 80) and len(a) == 5
    torch.testing.assert_close(a.streams, b.streams)
    assert not torch.equal(a.streams, c.streams)
    # Any row can be made on its own (as a data-parallel rank does)
    torch.testing.assert_close(training_streams(splits, 20, vocab, 0, range(2, 3), 5, 16).streams, a.streams[2:])
    # The labels are those of the programs' words
    tokens, labels = encode_stream(splits.train(3, '0/0/20', spec), vocab, 80)
    torch.testing.assert_close(tokens, a.streams[0])
    torch.testing.assert_close(labels, a.labels[0])


# ## The masked loss

def test_masked_loss_counts_only_print_positions():
    torch.manual_seed(0)
    labels = torch.zeros(6, 2, dtype=torch.long)
    labels[2, 0], labels[5, 1] = 7, 9
    logits = torch.randn(6, 2, 12)
    loss, correct, count = masked_loss(logits, labels)
    expected = F.cross_entropy(torch.stack([logits[2, 0], logits[5, 1]]), torch.tensor([7, 9]))
    assert count == 2 and loss.item() == pytest.approx(expected.item())
    # Other positions do not count: change them arbitrarily, nothing moves
    other = logits.clone()
    mask = labels == NO_LABEL_ID
    other[mask] = torch.randn_like(other[mask]) * 100
    loss2, correct2, _ = masked_loss(other, labels)
    assert loss2.item() == pytest.approx(loss.item()) and correct2 == correct
    # Accuracy: right at one print, wrong at the other
    logits[2, 0, 7] = 100.0
    logits[5, 1, 3] = 100.0
    assert masked_loss(logits, labels)[1] == 1
    # No print in a batch: zero loss, no NaN
    none = masked_loss(logits, torch.zeros_like(labels))
    assert none[0].item() == 0 and none[2] == 0


def test_train_statements():
    assert parse_train_statements('10:0,40:0.5') == [(10, 0.0), (40, 0.5)]
    assert parse_train_statements('20') == [(20, 0.0)]
    for bad in ('a', '10:0:1', '10:0.2', '10:0,20:0,30:0.5', '10:0,20:1', '0:0'):
        with pytest.raises(ValueError, match='train_statements'):
            parse_train_statements(bad)


# ## The experiment

def _configs(**values) -> StateTrackingConfigs:
    conf = StateTrackingConfigs()
    set_values(conf, {'d_model': 16, 'heads': 2, 'd_ff': 32, 'n_layers': 1, 'seq_len': 16, 'batch_size': 4,
                     'statements': 12, 'valid_programs': 8, 'test_programs': 8, 'epoch_segments': 3,
                     'memory_span': 8, 'use_cuda': False, **values})
    conf.validate()
    return conf


def _trainer(**values) -> Trainer:
    return _configs(**values).trainer


@pytest.mark.parametrize('model', ['feedback_transformer_kv', 'transformer'])
def test_carried_evaluation_equals_whole_streams(model):
    """Validation with the state carried across segments equals reading every stream in one call."""
    trainer = _trainer(model=model)
    streams = trainer.task.valid
    loss, accuracy = trainer.evaluate(streams, 0, len(streams))
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(streams.streams.t())
    expected, correct, count = masked_loss(logits, streams.labels.t())
    assert loss == pytest.approx(expected.item(), abs=1e-5)
    assert accuracy == pytest.approx(correct.item() / count.item())


def test_curriculum_epochs_and_train_batches():
    conf = _configs(train_statements='4:0,8:0.5', epochs=4)
    assert [conf.statements_at(e) for e in range(4)] == [4, 4, 8, 8]
    assert [_configs(train_statements='6').statements_at(e) for e in range(3)] == [6, 6, 6]
    assert _configs(train_statements='').statements_at(0) == 12, 'empty: as long as the test programs'
    x, y = conf.task.train.batch(0, 0)
    assert x.shape == (16, 4) and y.shape == (16, 4)
    # An epoch-0 stream holds 4-statement programs: its first END is early
    words = [conf.task.itos[t] for t in conf.task.train.make(0).streams[0].tolist()]
    assert words.index('END') <= 4 * 9


def test_the_two_experiments_keep_their_own_defaults_and_options():
    """Made in either order, in one process, each experiment has its own defaults and options (no labml leak)."""
    from labml_nn.transformers.feedback.experiment import Configs
    for _ in range(2):
        assert StateTrackingConfigs().d_model == 64 and StateTrackingConfigs().carry_memory
        assert Configs().d_model == 512 and not Configs().carry_memory and Configs().seq_len == 128
        assert config_default(Configs, 'd_model') == 512
    text, programs = config_options(Configs()), config_options(StateTrackingConfigs())
    # The text's keys are the text experiment's alone; each experiment's task and vocabulary are its own
    assert 'text' in text and 'train_loader' in text and 'text' not in programs and 'prompt' not in programs
    assert text['model'] == programs['model'] == ['feedback_transformer', 'feedback_transformer_kv', 'transformer']


def test_causal_state_round_trips_through_a_checkpoint_payload():
    conf = _configs(model='transformer', n_layers=2)
    model = conf.model.transformer
    _, state = model(torch.randn(11, 2, 16), return_state=True)
    assert state.keys[0].shape == (8, 2, 2, 8), 'the window keeps 8 positions'
    back = model.state_from_payload(state.to_payload(), torch.device('cpu'))
    assert isinstance(back, CausalState) and back.offset == 11
    for a, b in zip(back.keys + back.values, state.keys + state.values):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match='not a causal'):
        model.state_from_payload({'kind': 'feedback'}, torch.device('cpu'))
    with pytest.raises(ValueError, match='2 layers'):
        _configs(model='transformer', n_layers=3).model.transformer.state_from_payload(state.to_payload(),
                                                                                     torch.device('cpu'))


@pytest.mark.slow
@pytest.mark.parametrize('model', ['feedback_transformer_kv', 'transformer'])
def test_cli_runs_and_tests(tmp_path, model):
    args = [f'model={model}', 'd_model=16', 'heads=2', 'd_ff=32', 'n_layers=1', 'seq_len=16', 'batch_size=4',
            'statements=10', 'valid_programs=4', 'test_programs=8', 'epoch_segments=4', 'epochs=2',
            'memory_span=8', 'num_threads=1'] + (['memory_norm=true'] if model != 'transformer' else [])
    result = subprocess.run([sys.executable, '-m', 'labml_nn.transformers.feedback.state_tracking', *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={'RUN_UUID': 'run', 'PYTHONPATH': str(REPO), 'PATH': ''})
    assert result.returncode == 0, result.stderr[-3000:]
    payload = torch.load(tmp_path / 'logs' / f'state_tracking_{model}' / 'run' / 'checkpoints' / 'checkpoint.pt',
                         weights_only=True)
    assert payload['progress']['step'] == 8 and len(payload['history']['evaluations']) == 2
    assert 0 <= payload['history']['test']['accuracy'] <= 1
    assert payload['carried'][0] is not None, 'the carried state is in the checkpoint'


@pytest.mark.parametrize('args, message', [(['sample_tokens=5'], "Unknown config key 'sample_tokens'"),
                                           (['test_programs=2'], 'test_programs must be an int >= 32'),
                                           (['train_statements=5:0.5'], 'train_statements'),
                                           (['variables=9'], 'variables must be an int in'),
                                           (['carry_memory=true', 'memory_span=0'], 'needs a memory_span')])
def test_bad_configs(tmp_path, monkeypatch, capsys, args, message):
    from labml_nn.transformers.feedback.state_tracking import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(args)
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'logs').exists()


def test_warmup_and_cosine_schedules():
    import math

    from labml_nn.experiments.optimizer import CosineFactor, WarmupFactor
    warm = WarmupFactor(4)
    assert [warm(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = CosineFactor(4, 14)
    # Step s = i + 1: the warm-up, then half a cosine from 1 at s = 4 to 0 at s = 14
    assert [cos(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(8) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert cos(13) == pytest.approx(0.0, abs=1e-12) and cos(20) == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule_knows_the_run_length():
    conf = _configs(epochs=3, **{'optimizer.optimizer': 'AdamCosine', 'optimizer.warmup': 2,
                                 'optimizer.learning_rate': 0.1})
    _ = conf.trainer
    rates = []
    for _ in range(conf.total_steps()):
        rates.append(conf.optimizer.learning_rate)
        conf.optimizer.step()
    # 3 epochs of 3 segments: warm-up over 2 steps, then down to 0 at step 9
    assert conf.total_steps() == 9 and rates[1] == pytest.approx(0.1) and conf.optimizer.learning_rate < 1e-12


# ## What each print asks of a model

def test_print_facts_of_a_hand_counted_program():
    """Distances and last changes, counted by hand on a two-variable program."""
    text = ('x = 3 ; x ++ ; print x ; y = 9 ; if x < y : x ++ ; print x ; if y < 2 : x -- ; print x ; '
            'print y ; if x > 4 : y -- ; y ++ ; print y ; if y < 10 : x = 7 ; print x ; END')
    words = tuple(text.split())
    labels = tuple('_' for _ in words)
    facts = print_facts(Program(words, labels))
    # Word 2 assigns x = 3, word 12 y = 9. The `;` of the prints: 9 (x = 4 after `x ++`), 24 (x = 5: `x < y` held),
    # 35 (still 5: `y < 2` did not hold, so the last change is the taken `if`), 38 (y = 9, its assignment), 52
    # (y = 9 again: `x > 4` held, `y --`, then `y ++`), 64 (x = 7, assigned at word 60 inside a taken `if`)
    assert [(f.position, f.value, f.distance, f.changed_by) for f in facts] == [
        (9, 4, 7, '++/--'), (24, 5, 22, 'if'), (35, 5, 33, 'if'), (38, 9, 26, '='), (52, 9, 40, '++/--'),
        (64, 7, 4, 'if')]
    assert [f.bucket for f in facts] == [0, 0, 1, 0, 1, 0]
    # The generator's labels agree with the facts' values on real programs
    for program in generate_programs(ProgramSpec(3, 60), 20, 'facts'):
        facts = print_facts(program)
        assert [program.labels[f.position] for f in facts] == [str(f.value) for f in facts]
        assert len(facts) == sum(label != '_' for label in program.labels)


def test_held_out_facts_and_the_cut_layout():
    spec = ProgramSpec(1, 30)
    vocab = vocabulary(spec)
    programs = generate_programs(spec, 12, 'cut')
    whole = held_out_streams(programs, vocab, n_streams=4, seq_len=16)
    cut = held_out_streams(programs, vocab, n_streams=4, seq_len=16, layout='cut')
    # Every print has a cell, nothing else does
    for streams in (whole, cut):
        assert torch.equal(streams.facts >= 0, streams.labels != NO_LABEL_ID)
    # `cut`: the programs one after the other in 4 equal rows, the rest dropped (the authors' batchify)
    flat = encode_stream(programs, vocab)[0]
    length = flat.shape[0] // 4
    torch.testing.assert_close(cut.streams.reshape(-1), flat[:4 * length])
    assert cut.streams.shape == (4, length)
    # The breakdown of a whole layout counts every print once
    breakdown = Breakdown(whole)
    for idx, _, target in whole.iterate(0, 0, len(whole)):
        breakdown.add(idx, F.one_hot(target, len(vocab)).float(), target)
    report = breakdown.report()
    n_prints = sum(len(print_facts(p)) for p in programs)
    assert sum(c['prints'] for c in report['distance'].values()) == n_prints
    assert all(c['accuracy'] == 1.0 for c in report['changed_by'].values() if c['prints'])


def test_a_training_pool_is_reused_every_epoch():
    spec = ProgramSpec(1, 10)
    splits = ProgramSplits(spec, seed=1, valid_programs=4, test_programs=4, train_seed=2)
    vocab = vocabulary(spec)
    pool = {p.tokens for p in splits.pool(6)}
    assert len(pool) == 6 and splits.pool(6) is splits.pool(6)
    streams = [training_streams(splits, 10, vocab, epoch, range(2), 4, 16, pool=6) for epoch in (0, 1)]
    assert not torch.equal(streams[0].streams, streams[1].streams), 'another draw every epoch'
    # Every program of every stream is one of the pool's
    for s in streams:
        words = ' '.join(vocab[t] for t in s.streams[0].tolist())
        for program in words.split('END')[:-1]:
            assert tuple((program.strip() + ' END').split()) in pool
    # The held-out programs depend on the data seed only; the training programs on the training seed
    other = ProgramSplits(spec, seed=1, valid_programs=4, test_programs=4, train_seed=3)
    assert other.test == splits.test and other.pool(6) != splits.pool(6)


# ## What each baseline can see

@pytest.mark.parametrize('row', ['transformer_window', 'transformer_full', 'feedback_transformer_kv'])
def test_each_rows_visibility(row):
    """
    The script's `visible_words` for a row (its spans scaled down by 64 for a small test) is what the model really
    reaches: a change `k` words back changes the output iff `k <= visible_words`, across carried segments; a
    Feedback Transformer reaches further than span x layers.
    """
    sys.path.insert(0, str(REPO / 'experiments'))
    from state_tracking import PRESETS, settings_of, visible_words
    args = PRESETS['cpu']['rows'][row]
    span = max(2, int(settings_of(args)['memory_span']) // 64)
    args = [*args, f'memory_span={span}']
    visible = visible_words(args)
    s = settings_of(args)
    from labml_nn.transformers.feedback.build import ModelConfig, build_model
    torch.manual_seed(0)
    model = build_model(ModelConfig(s['model'], n_vocab=11, d_model=8, heads=2, d_ff=16,
                                    n_layers=int(s['n_layers']), memory_span=span)).double().eval()
    n = 3 * (visible or span * int(s['n_layers'])) + 4
    x = torch.randint(11, (n, 1))
    t = n - 1
    changed = []
    for k in range(1, n):
        y = x.clone()
        y[t - k] = (y[t - k] + 1) % 11
        # Read in segments of 3 with the state carried, as training and evaluation read the streams
        outs = []
        for tokens in (x, y):
            state, pieces = None, []
            for i in range(0, n, 3):
                out, state = model(tokens[i:i + 3], state=state, return_state=True)
                pieces.append(out)
            outs.append(torch.cat(pieces)[t])
        changed.append(bool((outs[0] - outs[1]).abs().max() > 1e-9))
    if visible is None:
        assert all(changed), 'the recurrent memory reaches every earlier word'
    else:
        assert changed == [k <= visible for k in range(1, n)]


@pytest.mark.slow
def test_the_script_runs_seeds_and_reports_visibility(tmp_path):
    """`--seeds 2` on a tiny setting: two test accuracies a row, what each row sees, the longest test program."""
    args = ['--rows', 'feedback_transformer_kv', 'transformer_window', '--seeds', '2', '--out', str(tmp_path / 'out'),
            'epochs=1', 'epoch_segments=2', 'valid_programs=32', 'test_programs=32', 'd_model=16', 'heads=2',
            'd_ff=32', 'statements=30']
    result = subprocess.run([sys.executable, str(REPO / 'experiments' / 'state_tracking.py'), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(last['accuracy']) == {'feedback_transformer_kv', 'transformer_window'}
    assert all(len(v) == 2 for v in last['accuracy_seeds'].values())
    assert last['accuracy']['transformer_window'] == pytest.approx(
        sum(last['accuracy_seeds']['transformer_window']) / 2, abs=1e-4)
    assert last['visible_words'] == {'feedback_transformer_kv': None, 'transformer_window': 32}
    programs = ProgramSplits(ProgramSpec(1, 30), 5, 32, 32).test
    assert last['program_words'] == max(len(p.tokens) for p in programs)
    assert set(last['distance']['transformer_window']) == {'<=32', '33-100', '>100'}
