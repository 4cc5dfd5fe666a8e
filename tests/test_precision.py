"""
Mixed precision: every path of the models under `torch.autocast` (bf16 and fp16), and low-precision parameters.

Tolerances. bfloat16 keeps 8 significant bits (a rounding is up to 2^-9 = 0.2% relative), float16 11 bits. Through 2
layers x 12 steps, and ReLU units near zero whose sign a rounding can flip, the whole gradient (all parameters and
the input, as one vector) of a small model stays within 0.2-2.6% of float32's with bf16 over 8 seeds, for both
loops, and within 0.5% with fp16. The tests allow 5% (bf16) and 1% (fp16) on the whole gradient, and 1% on the
outputs: a wrong gradient block is off by far more (order 100%).
"""

import pytest
import torch
from conftest import DEVICES, make_transformer

from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel
from labml_nn.transformers.feedback.build import ModelConfig, build_model

TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _model(kind, device, seed=0, memory_norm=False, dropout=0.0):
    # Default initialization, nudged so that position tables and memory weights are not all equal
    model = make_transformer(kind, d_model=16, heads=2, d_ff=32, n_layers=2, dtype=torch.float32, randomize=False,
                             seed=seed, memory_norm=memory_norm, dropout=dropout).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _run(model, x, dtype=None):
    """Outputs and the whole gradient (input and every parameter) of a fixed loss, under autocast to `dtype`."""
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(x)
    w = torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)
    grads = torch.autograd.grad((out.float() * w).sum(), [x, *model.parameters()])
    assert all(g.dtype == torch.float32 for g in grads)
    return out, torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('memory_norm', [False, True])
def test_autocast_is_close_to_float32_in_both_loops(kind, device, dtype, memory_norm):
    model = _model(kind, device, memory_norm=memory_norm)
    x = torch.randn(12, 3, 16, device=device, requires_grad=True)
    out32, grad32 = _run(model, x)
    results = {}
    for fused in (True, False):
        model.fused = fused
        out, grad = _run(model, x, dtype)
        # The residual stream (and so the output) stays in float32
        assert out.dtype == torch.float32
        assert _relative(out, out32) < 1e-2
        assert 0 < _relative(grad, grad32) < TOLERANCE[dtype], f"fused={fused}"
        results[fused] = out, grad
    # The fused loop's hand-written backward against autograd over the module loop, both under autocast
    assert _relative(results[True][0], results[False][0]) < 1e-2
    assert _relative(results[True][1], results[False][1]) < TOLERANCE[dtype]


@pytest.mark.parametrize('device', DEVICES)
def test_autocast_cache_is_low_precision_and_states_keep_their_precision(kind, device):
    model = _model(kind, device)
    x = torch.randn(6, 2, 16, device=device)
    for fused in (True, False):
        model.fused = fused
        for grad in (True, False):
            with torch.set_grad_enabled(grad), torch.autocast(device, dtype=torch.bfloat16):
                _, state = model(x[:3], return_state=True)
                # The keys and values come out of matrix products: low precision, as autocast makes them
                assert state.visible.dtype == torch.bfloat16
                model(x[3:], state=state.detach())
            with pytest.raises(TypeError, match="continue a state in the precision it was made in"):
                model(x[3:], state=state.detach())


def test_dropout_under_autocast_trains(kind):
    model = _model(kind, 'cpu', dropout=0.2)
    model.train()
    x = torch.randn(8, 2, 16, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('name', ['feedback_transformer', 'feedback_transformer_kv', 'transformer'])
def test_low_precision_parameters(name):
    # A model converted with .to(torch.bfloat16): training step and generation, everything in bf16
    torch.manual_seed(0)
    model = build_model(ModelConfig(name, n_vocab=11, d_model=16, heads=2, d_ff=32, n_layers=2)).to(torch.bfloat16)
    tokens = torch.randint(11, (9, 2))
    logits = model(tokens[:-1])
    assert logits.dtype == torch.bfloat16
    torch.nn.functional.cross_entropy(logits.float().view(-1, 11), tokens[1:].reshape(-1)).backward()
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.generate(tokens[:3], 5, temperature=0).shape == (8, 2)


def _trained_tiny_model(name: str) -> AutoregressiveModel:
    """A tiny model trained to continue a fixed pattern, so that its greedy choices have clear margins."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name, n_vocab=11, d_model=32, heads=2, d_ff=64, n_layers=2))
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7])
    data = pattern.repeat(6)[:, None].expand(-1, 4).clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(data[:-1]).view(-1, 11), data[1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    return model


@pytest.mark.parametrize('name', ['feedback_transformer', 'feedback_transformer_kv', 'transformer'])
def test_generation_under_autocast_equals_float32(name):
    model = _trained_tiny_model(name)
    prompt = torch.tensor([[3], [1], [4]])
    expected = model.generate(prompt, 40, temperature=0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = model.generate(prompt, 40, temperature=0)
    differ = (got != expected).nonzero()
    assert differ.numel() == 0, f"first divergence at token {differ[0, 0].item()}: {got[:, 0].tolist()} vs " \
                                f"{expected[:, 0].tolist()}"


def test_causal_baseline_under_autocast():
    torch.manual_seed(0)
    model = build_model(ModelConfig('transformer', n_vocab=11, d_model=16, heads=2, d_ff=32, n_layers=2))
    tokens = torch.randint(11, (12, 3))

    def loss_and_grads(dtype):
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(tokens[:-1])
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, 11), tokens[1:].reshape(-1))
        return loss, torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])

    loss32, grad32 = loss_and_grads(None)
    loss16, grad16 = loss_and_grads(torch.bfloat16)
    assert abs(loss16.item() - loss32.item()) < 1e-2 * loss32.item()
    assert _relative(grad16, grad32) < TOLERANCE[torch.bfloat16]
