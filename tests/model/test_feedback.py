"""Tests of both Feedback Transformers against the naive reference in `reference.py`, and of their state API."""

import copy

import pytest
import torch
from conftest import make_transformer
from reference import reference_forward
from torch.func import functional_call

from labml_nn.transformers.feedback import FeedbackState
from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel
from labml_nn.transformers.feedback.fused_records import DropoutMasks
from labml_nn.transformers.feedback.fused_steps import loop_config


def _loss(out):
    # A loss that weights every output element differently
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    return (out * w).sum() + out.pow(2).sum()


@pytest.mark.parametrize('max_distance, memory_norm', [(128, False), (3, False), (128, True)])
def test_outputs_and_gradients_equal_reference(kind, fused, max_distance, memory_norm, device):
    model = make_transformer(kind, max_distance=max_distance, fused=fused, memory_norm=memory_norm, device=device)
    x = torch.randn(9, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    out = model(x)
    grads = torch.autograd.grad(_loss(out), [x, *model.parameters()])
    ref, _ = reference_forward(model, x)
    ref_grads = torch.autograd.grad(_loss(ref), [x, *model.parameters()])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    for (name, _), g, r in zip([('x', None), *model.named_parameters()], grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-9, msg=f"gradient of {name}")


@pytest.mark.slow
@pytest.mark.parametrize('kind_, fused, memory_norm', [
    ('kv', True, False), ('weighted', True, False), ('kv', False, False), ('weighted', False, False),
    # The memory norm's backward is the fused loop's own (the module loop's is autograd's)
    ('kv', True, True), ('weighted', True, True)])
def test_gradcheck_end_to_end(kind_, fused, memory_norm):
    # Input and every parameter, dropout on: the seed is reset inside `f` so every evaluation draws the same masks
    model = make_transformer(kind_, d_model=4, heads=2, d_ff=4, n_layers=2, max_distance=2, dropout=0.2,
                             fused=fused, memory_norm=memory_norm)
    model.train()
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    x = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        torch.manual_seed(1)
        return functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_causality(kind, fused):
    model = make_transformer(kind, fused=fused)
    x = torch.randn(10, 2, 8, dtype=torch.float64)
    out = model(x)
    for t in [0, 4, 9]:
        x2 = x.clone()
        x2[t] += torch.randn(2, 8, dtype=torch.float64)
        out2 = model(x2)
        # Nothing before t changes; step t does
        torch.testing.assert_close(out2[:t], out[:t], rtol=0, atol=0)
        assert (out2[t] - out[t]).abs().max() > 1e-6
    # The feedback path: the last output depends on the first token
    x = x.detach().requires_grad_()
    g, = torch.autograd.grad(model(x)[-1].sum(), x)
    assert g[0].abs().max() > 1e-8


@pytest.mark.parametrize('chunks', [[1] * 8, [3, 1, 4], [2, 6], [7, 1]])
def test_state_continuation_equals_full_forward(kind, fused, chunks, device):
    model = make_transformer(kind, fused=fused, device=device)
    x = torch.randn(8, 3, 8, dtype=torch.float64, device=device, requires_grad=True)
    full = model(x)
    full_grads = torch.autograd.grad(_loss(full), [x, *model.parameters()])
    state, outs, i = None, [], 0
    for c in chunks:
        out, state = model(x[i:i + c], state=state, return_state=True)
        outs.append(out)
        i += c
    assert isinstance(state, FeedbackState) and state.n_steps == 8
    chunked = torch.cat(outs)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    # Gradients flow back through the state across calls
    grads = torch.autograd.grad(_loss(chunked), [x, *model.parameters()])
    for g, r in zip(grads, full_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_detach_cuts_gradients(kind, fused):
    model = make_transformer(kind, fused=fused)
    x = torch.randn(6, 2, 8, dtype=torch.float64, requires_grad=True)
    _, state = model(x[:3], return_state=True)
    out, _ = model(x[3:], state=state.detach(), return_state=True)
    g, = torch.autograd.grad(out.sum(), x)
    assert g[:3].abs().max() == 0 and g[3:].abs().max() > 0
    # The values are the same as without detach
    torch.testing.assert_close(out, model(x)[3:], rtol=0, atol=1e-12)


def test_truncated_backprop_loop(kind, fused):
    # Memory carried across "batches": backward each chunk, detach, continue; the cached memory stays right
    model = make_transformer(kind, fused=fused)
    x = torch.randn(9, 2, 8, dtype=torch.float64)
    state, outs = None, []
    for i in range(0, 9, 3):
        out, state = model(x[i:i + 3], state=state, return_state=True)
        out.sum().backward()
        state = state.detach()
        outs.append(out.detach())
    torch.testing.assert_close(torch.cat(outs), model(x).detach(), rtol=0, atol=1e-12)


def test_branching_from_a_state(kind):
    model = make_transformer(kind)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        _, state = model(x[:3], return_state=True)
        a, _ = model(x[3:], state=state, return_state=True)
        b, _ = model(-x[3:], state=state, return_state=True)
        a2, _ = model(x[3:], state=state, return_state=True)
        torch.testing.assert_close(a, model(x)[3:], rtol=0, atol=1e-12)
        torch.testing.assert_close(b, model(torch.cat([x[:3], -x[3:]]))[3:], rtol=0, atol=1e-12)
        torch.testing.assert_close(a2, a, rtol=0, atol=0)
    # With gradients flowing into the cache, the autograd loop refuses a second continuation ...
    model.fused = False
    _, state = model(x[:3], return_state=True)
    model(x[3:], state=state)
    with pytest.raises(ValueError, match="already continued"):
        model(x[3:], state=state)
    # ... unless detached first
    model(x[3:], state=state.detach())


def test_branching_with_gradients_fused(kind):
    # The fused loop copies the cache it continues from, so two continuations of one state are independent and
    # their gradients add up through the shared prefix
    model = make_transformer(kind)
    x = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    _, state = model(x[:3], return_state=True)
    a = model(x[3:], state=state)
    b = model(x[3:] * 2, state=state)
    got = torch.autograd.grad(_loss(a) + _loss(b), [x, *model.parameters()])
    ref_a, _ = reference_forward(model, x)
    ref_b, _ = reference_forward(model, torch.cat([x[:3], x[3:] * 2]))
    want = torch.autograd.grad(_loss(ref_a[3:]) + _loss(ref_b[3:]), [x, *model.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


@pytest.mark.slow
def test_long_sequences(kind):
    # Longer than 512 and than the position table: outputs against the naive reference, gradients of the fused
    # loop against autograd over the module loop (itself held to the reference above)
    model = make_transformer(kind, d_model=4, heads=1, d_ff=4, n_layers=1, max_distance=16)
    x = torch.randn(520, 1, 4, dtype=torch.float64, requires_grad=True)
    out = model(x)
    ref, _ = reference_forward(model, x.detach())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    grads = torch.autograd.grad(_loss(out), [x, *model.parameters()])
    model.fused = False
    module_grads = torch.autograd.grad(_loss(model(x)), [x, *model.parameters()])
    for g, r in zip(grads, module_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-9)


def test_memory_weights(kind):
    model = make_transformer(kind, n_layers=3)
    w = model.memory_weights()
    assert w.shape == (4,)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    model(torch.randn(4, 2, 8, dtype=torch.float64)).sum().backward()
    assert model.weights.grad is not None and model.weights.grad.abs().max() > 0


def test_memory_span_limits_attention(kind, fused, device):
    span = 3
    model = make_transformer(kind, memory_span=span, fused=fused, device=device)
    x = torch.randn(10, 2, 8, dtype=torch.float64, device=device, requires_grad=True)
    out = model(x)
    ref, _ = reference_forward(model, x, span=span)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    g = torch.autograd.grad(_loss(out), model.parameters())
    r = torch.autograd.grad(_loss(ref), model.parameters())
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    # Chunked with a span equals one call
    state, outs = None, []
    for i in range(0, 10, 4):
        o, state = model(x[i:i + 4], state=state, return_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs), out, rtol=0, atol=1e-12)


def test_memory_span_at_least_seq_len_is_unlimited(kind):
    limited = make_transformer(kind, memory_span=8)
    unlimited = make_transformer(kind)
    x = torch.randn(8, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(limited(x), unlimited(x), rtol=0, atol=0)


def test_memory_span_state_stays_bounded(kind):
    model = make_transformer(kind, memory_span=4, dtype=torch.float32)
    with torch.no_grad():
        _, state = model(torch.randn(1, 1, 8), return_state=True)
        for _ in range(200):
            _, state = model(torch.randn(1, 1, 8), state=state, return_state=True)
    assert state.n_steps == 201
    assert state.visible.shape[4] == 4
    assert state.kv._buffer.data.shape[4] <= 16


@pytest.mark.parametrize('bad, error, match', [
    (lambda: torch.randn(4, 8, dtype=torch.float64), ValueError, r"\[seq_len >= 1, batch_size >= 1, d_model=8\]"),
    (lambda: torch.randn(4, 2, 7, dtype=torch.float64), ValueError, "d_model=8"),
    (lambda: torch.randn(0, 2, 8, dtype=torch.float64), ValueError, "seq_len >= 1"),
    (lambda: torch.zeros(4, 2, 8, dtype=torch.long), TypeError, "floating point"),
    (lambda: [[0.0]], TypeError, "torch.Tensor"),
])
def test_bad_input(kind, bad, error, match):
    model = make_transformer(kind)
    with pytest.raises(error, match=match):
        model(bad())


def test_bad_state(kind):
    model = make_transformer(kind)
    _, state = model(torch.randn(3, 2, 8, dtype=torch.float64), return_state=True)
    with pytest.raises(ValueError, match="batch size 2, x_seq batch size 5"):
        model(torch.randn(1, 5, 8, dtype=torch.float64), state=state)
    with pytest.raises(TypeError, match="torch.float64"):
        model(torch.randn(1, 2, 8, dtype=torch.float32), state=state)
    with pytest.raises(TypeError, match="FeedbackState"):
        model(torch.randn(1, 2, 8, dtype=torch.float64), state=(1, 2))
    other = make_transformer('kv' if kind == 'weighted' else 'weighted')
    with pytest.raises(ValueError, match="cache entries"):
        other(torch.randn(1, 2, 8, dtype=torch.float64), state=state)


def test_bad_construction():
    from labml_nn.transformers.feedback import (
        FeedbackAttention,
        FeedbackTransformer,
        FeedbackTransformerKV,
        FeedbackTransformerLayer,
        FeedForward,
    )
    with pytest.raises(ValueError, match="multiple of heads"):
        FeedbackAttention(3, 8)
    with pytest.raises(ValueError, match="max_distance"):
        FeedbackAttention(2, 8, max_distance=0)
    layer = FeedbackTransformerLayer(d_model=8, attn=FeedbackAttention(2, 8), feed_forward=FeedForward(8, 16),
                                     dropout_prob=0.1)
    with pytest.raises(ValueError, match="is_kv_precomputed=True"):
        FeedbackTransformerKV(layer, 2, 8, 2)
    with pytest.raises(ValueError, match="n_layers"):
        FeedbackTransformer(layer, 0)
    with pytest.raises(ValueError, match="memory_span"):
        FeedbackTransformer(layer, 2, memory_span=0)
    kv_layer = FeedbackTransformerLayer(d_model=8, attn=FeedbackAttention(2, 8, is_kv_precomputed=True),
                                        feed_forward=FeedForward(8, 16), dropout_prob=0.1)
    with pytest.raises(ValueError, match="is_kv_precomputed=False"):
        FeedbackTransformer(kv_layer, 2)
    with pytest.raises(TypeError, match="FeedbackAttention"):
        FeedbackTransformerLayer(d_model=8, attn=torch.nn.Linear(8, 8), feed_forward=FeedForward(8, 16),
                                 dropout_prob=0.1)


def test_fused_and_autograd_loops_agree_with_dropout(kind):
    # The fused loop draws its dropout masks from one seed; feeding the same masks to the module loop's dropout
    # layers (in the order it calls them) must give the same outputs and gradients
    model = make_transformer(kind, dropout=0.3)
    model.train()
    T, B, D = 6, 2, 8
    x = torch.randn(T, B, D, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    fused_out = model(x)
    fused_grads = torch.autograd.grad(_loss(fused_out), [x, *model.parameters()])
    # Dropout really drops: another seed, other outputs
    torch.manual_seed(1)
    assert (model(x) - fused_out).abs().max() > 1e-3
    # The masks the fused loop drew (its seed is the first draw after `manual_seed(0)`)
    torch.manual_seed(0)
    cfg = loop_config(model, 0, False, True, None)
    masks = DropoutMasks(cfg, x, T, B, D, model.layers[0].feed_forward.layer1.out_features, n_max=T - 1)
    # The module loop's dropout calls, step by step and layer by layer: attention probabilities and the
    # attention branch (steps with memory), the hidden units, the feed-forward branch
    order = []
    for i in range(T):
        for l in range(model.n_layers):
            if i > 0:
                order += [masks.attn_probs(l, i, i), masks.resid[0, l, i]]
            order += [masks.hidden[l, i], masks.resid[1, l, i]]
    queue = iter(order)

    def dropout(input, p=0.5, training=True, inplace=False):
        mask = next(queue)
        assert mask.shape == input.shape
        return input * mask

    model.fused = False
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, 'dropout', dropout)
        module_out = model(x)
    assert next(queue, None) is None
    torch.testing.assert_close(module_out, fused_out, rtol=0, atol=1e-12)
    module_grads = torch.autograd.grad(_loss(module_out), [x, *model.parameters()])
    for g, r in zip(fused_grads, module_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_fused_state_then_autograd_continuation_is_refused(kind):
    model = make_transformer(kind)
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    _, state = model(x[:2], return_state=True)
    model.fused = False
    with pytest.raises(ValueError, match="fused training loop"):
        model(x[2:], state=state)
    model(x[2:], state=state.detach())
    with torch.no_grad():
        model(x[2:], state=state)


def test_memory_norm_parameters_and_continuation(kind):
    # Off: labml_nn's parameters exactly; on: the weighted model reuses its layers' norms, the KV model adds one
    plain = make_transformer(kind)
    normed = make_transformer(kind, memory_norm=True)
    extra = set(dict(normed.named_parameters())) - set(dict(plain.named_parameters()))
    assert extra == (set() if kind == 'weighted' else {'norm_memory.weight', 'norm_memory.bias'})
    # The norm changes the function (it is not silently ignored)...
    x = torch.randn(7, 2, 8, dtype=torch.float64)
    if kind == 'weighted':
        # The same weights (a state dict would refuse: it carries memory_norm)
        with torch.no_grad():
            for p, q in zip(normed.parameters(), plain.parameters()):
                p.copy_(q)
    assert (normed(x) - plain(x)).abs().max() > 1e-3
    # ...and a sequence continued in chunks equals one call
    out = normed(x)
    a, state = normed(x[:3], return_state=True)
    b, _ = normed(x[3:], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([a, b]), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize('saved, built', [(True, False), (False, True)])
def test_memory_norm_mismatch_is_an_error_at_load(kind, saved, built):
    # The weighted model's memory_norm adds no parameter: only the saved setting tells weights made with it apart
    source, target = make_transformer(kind, memory_norm=saved), make_transformer(kind, memory_norm=built)
    name = type(target).__name__
    message = rf"saved from a {name} with memory_norm={saved}, but this {name} has memory_norm={built}"
    for strict in (True, False):
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(source.state_dict(), strict=strict)
    # Inside a language model too
    lm = AutoregressiveModel(11, 8, make_transformer(kind, memory_norm=built))
    with pytest.raises(ValueError, match=message):
        lm.load_state_dict(AutoregressiveModel(11, 8, source).state_dict())


def test_memory_norm_is_saved_with_the_weights(kind, tmp_path):
    model = make_transformer(kind, memory_norm=True)
    state = model.state_dict()
    # A tensor, as every entry of a state dict, so weights-only checkpoints keep it
    assert state['_extra_state'].dtype == torch.bool and bool(state['_extra_state'])
    assert not bool(make_transformer(kind).state_dict()['_extra_state'])
    torch.save(state, tmp_path / 'weights.pt')
    other = make_transformer(kind, memory_norm=True, seed=1)
    other.load_state_dict(torch.load(tmp_path / 'weights.pt', weights_only=True))
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize('memory_norm', [False, True])
def test_state_dict_without_the_setting_loads_as_before(kind, memory_norm):
    # labml_nn's state dicts and checkpoints saved before the setting was kept have no extra state: they load
    # strictly, into either setting (there is nothing to check them against)
    source = make_transformer(kind, memory_norm=memory_norm, seed=1)
    old = {k: v for k, v in source.state_dict().items() if k != '_extra_state'}
    model = make_transformer(kind, memory_norm=memory_norm)
    model.load_state_dict(old)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    lm = AutoregressiveModel(11, 8, make_transformer(kind, memory_norm=memory_norm))
    lm.load_state_dict({k: v for k, v in AutoregressiveModel(11, 8, source).state_dict().items()
                        if not k.endswith('_extra_state')})
    if kind == 'weighted':
        make_transformer(kind, memory_norm=not memory_norm).load_state_dict(old)


def test_input_dtype_must_match_the_parameters(kind):
    model = make_transformer(kind, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"x_seq is torch.float64 but the model's parameters are torch.float32"):
        model(torch.randn(3, 2, 8, dtype=torch.float64))


def test_inference_cache_follows_parameter_changes(kind):
    # Generation keeps parameter-derived tensors between calls: every way of changing a parameter must reach it
    model = make_transformer(kind)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    other = make_transformer(kind, seed=1)
    with torch.no_grad():
        before = model(x)
        # In place (as an optimizer step)
        model.layers[0].feed_forward.layer1.weight.add_(1.0)
        changed = model(x)
        assert (changed - before).abs().max() > 1e-6
        # Replaced parameter objects
        model.load_state_dict(other.state_dict(), assign=True)
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=1e-12)
    # And the fused training loop agrees with the inference path after all that
    torch.testing.assert_close(model(x).detach(), other(x).detach(), rtol=0, atol=1e-12)


def test_inference_follows_every_parameter_change(kind):
    # After each change the inference path (fused, without autograd) gives what the module loop computes afresh
    model = make_transformer(kind)
    x = torch.randn(5, 2, 8, dtype=torch.float64)

    def check(x=x, atol=1e-12):
        with torch.no_grad():
            fast = model(x)
            model.fused = False
            slow = model(x)
            model.fused = True
        torch.testing.assert_close(fast, slow, rtol=0, atol=atol)

    check()
    # Inference keeps what it derives from the parameters (and every check below must see through it)
    assert model.inference_cache.kept is not None
    # An optimizer step (through the fused training loop)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _loss(model(x)).backward()
    optimizer.step()
    check()
    # A state dict copied in, and one assigned (new parameter objects)
    model.load_state_dict(make_transformer(kind, seed=2).state_dict())
    check()
    model.load_state_dict(make_transformer(kind, seed=3).state_dict(), assign=True)
    check()
    # A parameter replaced by attribute, and a parameter's data replaced
    model.layers[0].attn.output.weight = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.float64))
    check()
    model.weights.data = torch.randn_like(model.weights)
    check()
    # A submodule replaced on the way to parameters
    model.layers[1].feed_forward.layer1 = torch.nn.Linear(8, 16, dtype=torch.float64)
    check()
    # Other parameters for one call only
    params = {name: p + 0.1 for name, p in model.named_parameters()}
    with torch.no_grad():
        swapped = functional_call(model, params, (x,))
        model.fused = False
        torch.testing.assert_close(swapped, functional_call(model, params, (x,)), rtol=0, atol=1e-12)
        model.fused = True
    check()
    # A copy starts without the original's kept tensors
    assert copy.deepcopy(model).inference_cache.kept is None
    # Converted: new tensors in the same parameter objects
    model.float()
    check(x.float(), atol=1e-5)


def test_recency_init():
    from labml_nn.transformers.feedback import FeedbackAttention
    plain, recent = FeedbackAttention(4, 16, max_distance=10), FeedbackAttention(4, 16, max_distance=10,
                                                                               recency_init=True)
    assert plain.key_pos_bias.abs().max() == 0
    s = recent.key_pos_bias.detach()
    # Distance 1 is not penalized; every head prefers nearer slots; the first head most steeply (ALiBi's slopes)
    assert torch.all(s[0] == 0) and torch.all(s[1:] < s[:-1])
    d_k = 16 // 4
    slopes = -(s[1] - s[0]) / d_k ** 0.5
    torch.testing.assert_close(slopes, torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]))
