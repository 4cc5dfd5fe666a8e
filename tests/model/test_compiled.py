"""
Tests of the compiled inference step (`compile=True`, compiled.py and static_step.py): the same values as the eager
fast path and the float64 reference, for both variants, with a memory span, carried state and dropout in eval
mode; and clear errors for a bad `compile=` and for a missing compiler.

Compiling is slow (seconds per shape on two cores): the models are tiny, share one configuration (so that later
tests reuse the code compiled by earlier ones) and run a few steps each.
"""

import copy

import pytest
import torch
from conftest import make_transformer
from reference import reference_forward

from labml_nn.transformers.feedback import compiled
from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel
from labml_nn.transformers.feedback.build import ModelConfig, build_transformer

needs_cxx = pytest.mark.skipif(compiled.find_cxx() is None,
                               reason="no C++ compiler found: torch.compile cannot build the step on the CPU")

SIZES = dict(d_model=8, heads=2, d_ff=16, n_layers=2, max_distance=6, memory_norm=True)


def pair(kind: str, **kwargs):
    """A compiled model and an eager one with the same weights."""
    model = make_transformer(kind, compile=True, **SIZES, **kwargs)
    eager = make_transformer(kind, **SIZES, **kwargs)
    eager.load_state_dict(model.state_dict())
    return model, eager


@pytest.fixture(scope='module', params=['weighted', 'kv'])
def models(request):
    """One compiled model per variant for the module's tests, with its eager twin."""
    return pair(request.param)


def _x(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(T, B, SIZES['d_model'], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@needs_cxx

def _token_by_token(model, x: torch.Tensor, first: int):
    """`model` over `x[:first]` in one call, then one token at a time from its state: the outputs and the state."""
    out, state = model(x[:first], return_state=True)
    outs = [out]
    for t in range(first, x.shape[0]):
        out, state = model(x[t:t + 1], state=state, return_state=True)
        outs.append(out)
    return outs, state


def test_compiled_equals_eager_and_reference(models):
    model, eager = models
    x = _x(9)
    with torch.no_grad():
        out = model(x)
        expected, _ = reference_forward(eager, x)
        torch.testing.assert_close(out, eager(x))
        torch.testing.assert_close(out, expected)


@needs_cxx
def test_carried_state_in_chunks_and_across_paths(models):
    """
    A state continues one token at a time, and a compiled model's state continues eagerly (and the reverse); batch 1,
    as in generation (the step's products of one row are sums).
    """
    model, eager = models
    x = _x(9, B=1)
    with torch.no_grad():
        full = eager(x)
        outs, state = _token_by_token(model, x, 3)
        torch.testing.assert_close(torch.cat(outs), full)
        # Compiled, then eager; eager, then compiled
        _, state = model(x[:5], return_state=True)
        torch.testing.assert_close(eager(x[5:], state=state), full[5:])
        _, state = eager(x[:5], return_state=True)
        torch.testing.assert_close(model(x[5:], state=state), full[5:])


@needs_cxx
@pytest.mark.parametrize('kind', ['weighted', 'kv'])
def test_memory_span_and_dropout_in_eval(kind):
    """A memory span shorter than the text, and dropout that eval mode switches off, against the reference."""
    model, eager = pair(kind, memory_span=3, dropout=0.3)
    model.eval()
    x = _x(8)
    with torch.no_grad():
        out, state = model(x[:5], return_state=True)
        out = torch.cat([out, model(x[5:], state=state)])
    expected, _ = reference_forward(eager, x, span=3)
    torch.testing.assert_close(out, expected)


@needs_cxx
def test_changed_parameters_and_copies(models):
    """The compiled step reads the parameters as they are now; a deep copy compiles (or reuses) its own."""
    model, eager = models
    x = _x(4)
    with torch.no_grad():
        for m in (model, eager):
            m.layers[0].feed_forward.layer1.weight.mul_(1.5)
        torch.testing.assert_close(model(x), eager(x))
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(x), eager(x))
        for m in (model, eager):
            m.layers[0].feed_forward.layer1.weight.div_(1.5)


@needs_cxx
def test_training_with_compile_is_the_fused_loop(models):
    """With autograd on, a compiled model trains as before: same outputs and gradients as its eager twin."""
    model, eager = models
    x = _x(5)
    model(x).square().sum().backward()
    eager(x).square().sum().backward()
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
        p.grad = q.grad = None


@needs_cxx
def test_past_the_recompile_limit_the_step_runs_eagerly(models):
    """A shape the compiler may not build any more (here: any new one) runs the same step eagerly: same values."""
    model, eager = models
    x = _x(4, B=3)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        torch.testing.assert_close(model(x), eager(x))


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize('kind', ['weighted', 'kv'])
def test_generation_picks_the_same_tokens(kind):
    """Greedy generation (batch 1: a shape of its own) picks the same tokens compiled and eager."""
    model, eager = pair(kind)
    lm, lm_eager = AutoregressiveModel(11, 8, model).double(), AutoregressiveModel(11, 8, eager).double()
    lm_eager.load_state_dict(lm.state_dict())
    prompt = torch.tensor([[1], [4], [2]])
    assert torch.equal(lm.generate(prompt, 12, temperature=0.0), lm_eager.generate(prompt, 12, temperature=0.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (experiments/gpu_check.sh runs it)")
@pytest.mark.parametrize('kind', ['weighted', 'kv'])
def test_reduce_overhead_on_cuda(kind):
    """CUDA graphs (`compile='reduce-overhead'`): a state continued token by token, and greedy generation."""
    model = make_transformer(kind, compile='reduce-overhead', dtype=torch.float32, device='cuda', **SIZES)
    eager = make_transformer(kind, dtype=torch.float32, device='cuda', **SIZES)
    eager.load_state_dict(model.state_dict())
    x = _x(10).float().cuda()
    with torch.no_grad():
        full = eager(x)
        outs, state = _token_by_token(model, x, 2)
        torch.testing.assert_close(torch.cat(outs), full, atol=1e-4, rtol=1e-4)
    lm, lm_eager = AutoregressiveModel(11, 8, model).cuda(), AutoregressiveModel(11, 8, eager).cuda()
    lm_eager.load_state_dict(lm.state_dict())
    prompt = torch.tensor([[1], [4], [2]], device='cuda')
    assert torch.equal(lm.generate(prompt, 12, temperature=0.0), lm_eager.generate(prompt, 12, temperature=0.0))


@needs_cxx
@pytest.mark.slow
def test_under_autocast_as_the_module_loop():
    """Under bfloat16 autocast the compiled step follows autocast's rules as the loop does (bfloat16 cache)."""
    model = make_transformer('kv', compile=True, dtype=torch.float32, **SIZES)
    loop = make_transformer('kv', fused=False, dtype=torch.float32, **SIZES)
    loop.load_state_dict(model.state_dict())
    x = _x(6).float()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out, state = model(x, return_state=True)
        expected, expected_state = loop(x, return_state=True)
    assert state.visible.dtype == expected_state.visible.dtype == torch.bfloat16
    # bfloat16 products: a few of its units in the last place
    torch.testing.assert_close(out, expected, atol=0.1, rtol=0.05)


# Errors: none of these needs a compiler

def test_compile_from_the_model_config():
    """`compile=` of the builder's config reaches the model (nothing is compiled before the first call)."""
    config = ModelConfig('feedback_transformer_kv', d_model=8, heads=2, d_ff=16, n_layers=1, compile='reduce-overhead')
    model = build_transformer(config)
    assert model.compiled_step.mode == 'reduce-overhead' and model.compiled_step.compiled == {}
    assert build_transformer(ModelConfig('feedback_transformer', d_model=8, heads=2, n_layers=1)).compiled_step is None


def test_bad_compile_values():
    with pytest.raises(ValueError, match="compile must be"):
        make_transformer('kv', compile='fast')
    with pytest.raises(ValueError, match="fused=True"):
        make_transformer('kv', compile=True, fused=False)
    with pytest.raises(ValueError, match="feedback models"):
        build_transformer(ModelConfig('transformer', d_model=8, heads=2, d_ff=16, n_layers=1, compile=True))


def test_missing_cxx_is_a_clear_error_before_any_step(monkeypatch):
    monkeypatch.setattr(compiled, 'find_cxx', lambda: None)
    model = make_transformer('kv', compile=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        model(_x(3))
    # Nothing was compiled or cached
    assert model.compiled_step.compiled == {}


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(compiled, 'has_triton', lambda: False)
    with pytest.raises(RuntimeError, match="needs Triton"):
        compiled.check_compile(True, 'cuda')
    # Off: nothing to check
    compiled.check_compile(False, 'cuda')


def test_experiment_without_a_compiler_exits_2(tmp_path, monkeypatch, capsys):
    from support import expect_config_error
    monkeypatch.setattr(compiled, 'find_cxx', lambda: None)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    expect_config_error(tmp_path, monkeypatch, capsys, ['compile=true'], "needs a C++ compiler")
    expect_config_error(tmp_path, monkeypatch, capsys, ['compile=fast'], "compile must be one of")
