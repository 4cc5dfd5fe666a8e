"""
The paper's accelerators in the experiment: `memory_span` as a config, memory carried across batches over
contiguous streams (with resume), the sequence-length curriculum, and initialization from a parallel transformer.
"""

import pytest
import torch
import torch.nn.functional as F
from labml import monit
from support import TEXT, TINY, checkpoint_of, expect_config_error, run_cli, run_torchrun

from labml_nn.experiments import checkpoint as ckpt
from labml_nn.experiments.curriculum import fold_sequences, parse_curriculum
from labml_nn.experiments.labml_adapter import set_values
from labml_nn.experiments.trainer import Trainer
from labml_nn.tasks.text import ContiguousStreams
from labml_nn.transformers.causal import CausalAttention, CausalTransformer, CausalTransformerLayer
from labml_nn.transformers.feedback import (
    FeedbackAttention,
    FeedbackTransformer,
    FeedbackTransformerKV,
    FeedbackTransformerLayer,
    FeedForward,
)
from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel
from labml_nn.transformers.feedback.experiment import Configs, main
from labml_nn.transformers.feedback.init_from import check_source_checkpoint, copy_from_transformer


@pytest.fixture(autouse=True)
def _need_text():
    if not TEXT.is_file():
        pytest.skip(f'Tiny Shakespeare not found at {TEXT}; set TINY_SHAKESPEARE_PATH')


# ## Contiguous streams

def test_streams_are_contiguous_and_shard():
    data = torch.arange(1000)
    streams = ContiguousStreams(data, seq_len=10, batch_size=4)
    # Stream length 999 // 4 = 249 tokens, 24 segments of 10
    assert streams.stream_len == 249 and len(streams) == 24
    for idx in (0, 1, 23):
        x, y = streams.batch(0, idx)
        assert x.shape == (10, 4)
        # Row `r` of batch `i` is tokens `r * 249 + 10 * i ...` (the data are their own positions)
        torch.testing.assert_close(x[0], torch.arange(4) * 249 + 10 * idx)
        torch.testing.assert_close(x, x[:1] + torch.arange(10)[:, None])
        torch.testing.assert_close(y, x + 1)
    # Batch i + 1 continues batch i in every row; the same in every epoch
    torch.testing.assert_close(streams.batch(0, 1)[0][0], streams.batch(0, 0)[0][-1] + 1)
    torch.testing.assert_close(streams.batch(3, 5)[0], streams.batch(0, 5)[0])
    # Two ranks: each its own streams, together the single-process batch
    shards = [ContiguousStreams(data, seq_len=10, batch_size=4, rank=r, world_size=2) for r in range(2)]
    torch.testing.assert_close(torch.cat([s.batch(0, 7)[0] for s in shards], dim=1), streams.batch(0, 7)[0])
    with pytest.raises(ValueError, match='too short for 8 contiguous streams'):
        ContiguousStreams(torch.arange(50), seq_len=10, batch_size=8)


# ## Curriculum

def test_parse_curriculum_and_fold():
    assert parse_curriculum('16:0, 32:0.25,64:0.5', 64) == [(16, 0.0), (32, 0.25), (64, 0.5)]
    x = torch.arange(12).view(6, 2)
    # [6, 2] in pieces of 3: rows 0..2 then 3..5, side by side
    folded = fold_sequences(x, 3)
    assert folded.shape == (3, 4)
    torch.testing.assert_close(folded, torch.cat([x[:3], x[3:]], dim=1))


@pytest.mark.parametrize('spec, message', [
    ('16:0,128:0.5', 'stage length 128 must be in [1, seq_len=64]'),
    ('24:0', 'stage length 24 must divide seq_len=64'),
    ('16:0,32:0.5,64:0.4', 'start fractions must increase'),
    ('16:0.1,64:0.5', 'the first stage must start at 0'),
    ('16', 'stages are length:start_fraction'),
    ('a:0', 'stages are length:start_fraction'),
])
def test_curriculum_errors(spec, message):
    with pytest.raises(ValueError) as e:
        parse_curriculum(spec, 64)
    assert message in str(e.value) and 'seq_len_curriculum=' in str(e.value)


def _trainer(**values) -> Trainer:
    conf = Configs()
    set_values(conf, {'d_model': 16, 'heads': 2, 'd_ff': 32, 'n_layers': 1, 'seq_len': 16, 'batch_size': 4,
                      'epochs': 1, 'sample_tokens': 0, 'text_path': str(TEXT), 'use_cuda': False,
                      'optimizer.optimizer': 'Adam', 'optimizer.learning_rate': 1e-3, **values})
    conf.validate()
    return conf.trainer


def test_curriculum_stages_follow_the_steps():
    trainer = _trainer(seq_len_curriculum='4:0,8:0.25,16:0.5', train_steps=100)
    assert [trainer.curriculum.length(s) for s in (0, 24, 25, 49, 50, 99)] == [4, 4, 8, 8, 16, 16]
    seen = []
    model = trainer.ddp_model
    trainer.ddp_model = lambda data: seen.append(tuple(data.shape)) or model(data)
    for step in (0, 30, 60):
        trainer.progress['step'] = step
        trainer.train_step(*trainer.task.train.batch(0, 0))
    # The same 64 tokens per step, cut into shorter sequences side by side
    assert seen == [(4, 16), (8, 8), (16, 4)]


# ## memory_span and carried memory

def test_memory_span_reaches_both_models():
    for model in ('feedback_transformer', 'feedback_transformer_kv'):
        assert _trainer(model=model, memory_span=8).model.transformer.memory_span == 8
    assert _trainer(model='feedback_transformer').model.transformer.memory_span is None
    # The parallel transformer: a local window of the same span
    assert _trainer(model='transformer', memory_span=8).model.transformer.memory_span == 8
    assert _trainer(model='transformer').model.transformer.memory_span is None


def test_carried_validation_equals_whole_streams():
    """Validation with carried memory equals running every validation stream through the model in one call."""
    trainer = _trainer(model='feedback_transformer_kv', carry_memory=True, memory_span=5)
    n_batches, seq_len, batch_size = 3, 16, 4
    loss, accuracy = trainer.evaluate(trainer.task.valid, 0, n_batches)
    # Independently: the validation text cut into 4 streams, each read in one call
    text = trainer.task.text
    data = text.text_to_i(text.valid)
    stream_len = (data.shape[0] - 1) // batch_size
    starts = torch.arange(batch_size) * stream_len
    index = starts[None, :] + torch.arange(n_batches * seq_len + 1)[:, None]
    tokens = data[index]
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(tokens[:-1])
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[1:].reshape(-1))
    assert loss == pytest.approx(expected.item(), abs=1e-5)
    assert accuracy == pytest.approx((logits.argmax(-1) == tokens[1:]).float().mean().item(), abs=1e-6)
    # A fresh memory at every batch gives another loss: the memory really is carried
    with torch.no_grad():
        pieces = [trainer.model(tokens[i * seq_len:(i + 1) * seq_len]) for i in range(n_batches)]
    fresh = F.cross_entropy(torch.cat(pieces).reshape(-1, logits.shape[-1]), tokens[1:].reshape(-1))
    assert abs(fresh.item() - loss) > 1e-4


def test_carried_training_state_grows_and_resets():
    trainer = _trainer(model='feedback_transformer', carry_memory=True, memory_span=6, train_steps=3)
    for _ in monit.loop(range(1)):
        trainer.train_part(0, 3)
    state = trainer.memory.states['train']
    assert state.n_steps == 3 * 16 and state.visible.shape[state.kv.dim] == 6 and not state.visible.requires_grad
    # A new epoch starts with an empty memory
    trainer.progress['batch'] = 0
    trainer.progress['step'] = 0
    for _ in monit.loop(range(1)):
        trainer.train_part(1, 1)
    assert trainer.memory.states['train'].n_steps == 16


@pytest.mark.slow
def test_carry_memory_resume_continues_exactly(tmp_path):
    """Stop after 3 steps and resume: steps 4 and 5 use the carried memory as an uninterrupted run does."""
    args = ['model=feedback_transformer_kv', *TINY, 'carry_memory=true', 'memory_span=12']
    assert run_cli(tmp_path, [*args, 'train_steps=3'], uuid='first').returncode == 0
    resumed = run_cli(tmp_path, ['resume=first', 'train_steps=5'], uuid='resumed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_cli(tmp_path, [*args, 'train_steps=5'], uuid='straight').returncode == 0
    first = checkpoint_of(tmp_path, 'feedback_transformer_kv', 'first')
    carried = first['carried'][0]
    assert carried['n_steps'] == 3 * 16 and carried['visible'].shape[4] == 12  # the cache's time axis
    a = checkpoint_of(tmp_path, 'feedback_transformer_kv', 'resumed')
    b = checkpoint_of(tmp_path, 'feedback_transformer_kv', 'straight')
    loss_a = [h['loss'] for h in a['history']['train']]
    loss_b = [h['loss'] for h in b['history']['train']]
    assert loss_a[3:] == pytest.approx(loss_b[3:], abs=1e-6, rel=0)
    for key, value in b['model'].items():
        torch.testing.assert_close(a['model'][key], value, rtol=0, atol=1e-6)


# ## Initialization from a parallel transformer

def _causal(d_model=16, heads=2, n_layers=2, n_vocab=11):
    layer = CausalTransformerLayer(d_model=d_model, attn=CausalAttention(heads, d_model, 0.0, max_distance=6),
                                   feed_forward=FeedForward(d_model, 32, 0.0), dropout_prob=0.0)
    model = AutoregressiveModel(n_vocab, d_model, CausalTransformer(layer, n_layers))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def _feedback(kv: bool, d_model=16, n_layers=2):
    layer = FeedbackTransformerLayer(d_model=d_model,
                                     attn=FeedbackAttention(2, d_model, 0.0, is_kv_precomputed=kv, max_distance=8),
                                     feed_forward=FeedForward(d_model, 32, 0.0), dropout_prob=0.0)
    transformer = FeedbackTransformerKV(layer, n_layers, d_model, 2) if kv else FeedbackTransformer(layer, n_layers)
    return AutoregressiveModel(11, d_model, transformer)


@pytest.mark.parametrize('kv', [False, True])
def test_init_from_copies_every_compatible_weight(kv):
    source = _causal().state_dict()
    target = _feedback(kv)
    memory_weights = target.transformer.weights.detach().clone()
    copied, left, unused = copy_from_transformer(source, target)
    params = dict(target.named_parameters())
    assert left == ['transformer.weights'] and unused == []
    torch.testing.assert_close(params['transformer.weights'], memory_weights)
    for name in ('src_embed.weight', 'generator.bias', 'transformer.norm.weight',
                 'transformer.layers.1.feed_forward.layer1.weight', 'transformer.layers.0.attn.query.linear.weight',
                 'transformer.layers.1.attn.output.bias', 'transformer.layers.0.norm_ff.bias',
                 'transformer.layers.1.attn.query_pos_bias'):
        torch.testing.assert_close(params[name], source[name], rtol=0, atol=0)
    # Distance d: feedback row d - 1, causal row d; beyond the causal table (6 rows) its last row
    for table in ('key_pos_embeddings', 'key_pos_bias'):
        got, src = params[f'transformer.layers.1.attn.{table}'], source[f'transformer.layers.1.attn.{table}']
        assert got.shape[0] == 8
        for d in range(1, 9):
            torch.testing.assert_close(got[d - 1], src[min(d, 5)], rtol=0, atol=0)
    if kv:
        expected = (source['transformer.layers.0.attn.key.linear.weight'] +
                    source['transformer.layers.1.attn.key.linear.weight']) / 2
        torch.testing.assert_close(params['transformer.key.weight'], expected)
        assert ('transformer.value.weight', 'mean of transformer.layers.*.attn.value.linear.weight') in copied
    else:
        torch.testing.assert_close(params['transformer.layers.1.attn.value.linear.weight'],
                                   source['transformer.layers.1.attn.value.linear.weight'], rtol=0, atol=0)
    assert len(copied) + len(left) == len(params)


def test_init_from_layers_and_errors():
    # A deeper feedback model: the extra layer is left at initialization; a shallower one leaves layers unused
    _, left, _ = copy_from_transformer(_causal(n_layers=1).state_dict(), _feedback(False, n_layers=2))
    assert 'transformer.layers.1.attn.query.linear.weight' in left
    _, _, unused = copy_from_transformer(_causal(n_layers=2).state_dict(), _feedback(False, n_layers=1))
    assert 'transformer.layers.1.feed_forward.layer2.bias' in unused
    target = _feedback(True)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as e:
        copy_from_transformer(_causal(d_model=8).state_dict(), target)
    assert 'src_embed.weight' in str(e.value) and '[11, 16]' in str(e.value) and '[11, 8]' in str(e.value)
    # Nothing was changed
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match='trained with model=feedback_transformer_kv; init_from takes a checkpoint '
                                         'of model=transformer'):
        check_source_checkpoint({'config': {'model': 'feedback_transformer_kv'}, 'model': {}}, 'x')


def test_init_from_in_the_experiment(tmp_path, monkeypatch, capsys):
    """A `model=transformer` checkpoint starts a feedback run; the weights arrive, the log names them."""
    monkeypatch.chdir(tmp_path)
    source = _causal(d_model=16, n_layers=1)
    payload = {'model': source.state_dict(), 'optimizer': {}, 'progress': {}, 'rng': [],
               'config': {'model': 'transformer'}}
    path = tmp_path / 'transformer.pt'
    ckpt.save_atomic(payload, path)
    # The test source has an 11-token vocabulary, the text 65: a clear shape error
    conf = Configs()
    set_values(conf, {'model': 'feedback_transformer_kv', 'd_model': 16, 'heads': 2, 'd_ff': 32, 'n_layers': 1,
                      'text_path': str(TEXT), 'use_cuda': False, 'init_from': str(path), 'sample_tokens': 0})
    conf.validate()
    with pytest.raises(ValueError, match=r'src_embed.weight: the feedback model has \[65, 16\]'):
        _ = conf.trainer
    payload['model'] = {k: v for k, v in payload['model'].items() if k not in ('src_embed.weight', 'generator.weight',
                                                                               'generator.bias')}
    ckpt.save_atomic(payload, path)
    conf = Configs()
    set_values(conf, {'model': 'feedback_transformer_kv', 'd_model': 16, 'heads': 2, 'd_ff': 32, 'n_layers': 1,
                      'text_path': str(TEXT), 'use_cuda': False, 'init_from': str(path), 'sample_tokens': 0})
    _ = conf.trainer
    torch.testing.assert_close(conf.model.transformer.layers[0].feed_forward.layer1.weight,
                               source.transformer.layers[0].feed_forward.layer1.weight)
    out = capsys.readouterr().out
    assert 'copied 18 parameters' in out and 'left at initialization' in out and 'src_embed.weight' in out


# ## Configuration errors

BAD = [
    (['memory_span=-1'], 'memory_span must be an int >= 1 (the latest memory vectors each step attends to), or 0'),
    (['carry_memory=true'], 'carry_memory=True needs a memory_span >= 1'),
    (['model=transformer', 'carry_memory=true'], 'carry_memory=True needs a memory_span >= 1'),
    (['model=transformer', 'init_from=some_run'], 'init_from is an option of the feedback models, not of model=trans'),
    (['model=transformer', 'memory_norm=true'], 'memory_norm is an option of the feedback models'),
    (['seq_len=64', 'seq_len_curriculum=32:0,128:0.5'], 'stage length 128 must be in [1, seq_len=64]'),
    (['seq_len_curriculum=32:0', 'carry_memory=true', 'memory_span=8'], 'cannot be combined with carry_memory'),
    (['init_from=no_such_run'], 'init_from=no_such_run: not a checkpoint file, a run folder, or the UUID'),
]


@pytest.mark.parametrize('args, message', BAD)
def test_bad_accelerator_configs(tmp_path, monkeypatch, capsys, args, message):
    expect_config_error(tmp_path, monkeypatch, capsys, args, message)


def test_init_from_a_feedback_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('TINY_SHAKESPEARE_PATH', str(TEXT))
    ckpt.save_atomic({'model': {}, 'optimizer': {}, 'progress': {}, 'rng': [], 'config': {}}, tmp_path / 'fb.pt')
    with pytest.raises(SystemExit):
        main([f'init_from={tmp_path / "fb.pt"}'])
    assert 'trained with model=feedback_transformer; init_from takes a checkpoint of model=transformer' in \
        capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason='needs torch.distributed')
def test_carry_memory_two_ranks_equal_one_process(tmp_path):
    """Under torchrun every rank reads its own streams: 2 ranks x 4 streams train as 1 process x 8 streams."""
    args = ['model=feedback_transformer', *TINY, 'carry_memory=true', 'memory_span=20', 'train_steps=3']
    ddp = run_torchrun(tmp_path, args, uuid='ddp')
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert run_cli(tmp_path, args, uuid='single').returncode == 0
    a = checkpoint_of(tmp_path, 'feedback_transformer', 'ddp.0')
    b = checkpoint_of(tmp_path, 'feedback_transformer', 'single')
    assert [h['loss'] for h in a['history']['train']] == pytest.approx([h['loss'] for h in b['history']['train']],
                                                                       abs=1e-5, rel=0)
    # Each rank's carried memory is in the checkpoint: 4 streams each, the single process's 8 side by side
    rows, full = [c['visible'] for c in a['carried']], b['carried'][0]['visible']
    # The batch axis: the only one where a rank's cache differs from the single process's
    (axis,) = [i for i, (n, m) in enumerate(zip(rows[0].shape, full.shape)) if n != m]
    assert len(rows) == 2 and rows[0].shape[axis] == 4 and full.shape[axis] == 8
    torch.testing.assert_close(torch.cat(rows, dim=axis), full, rtol=0, atol=1e-5)
