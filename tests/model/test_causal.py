"""
The causal (parallel) baseline: against a naive step-by-step reference in float64, chunked == full through the
key/value cache, causality, and clear errors.
"""

import math

import pytest
import torch

from labml_nn.transformers.causal import CausalAttention, CausalState, CausalTransformer, CausalTransformerLayer
from labml_nn.transformers.feed_forward import FeedForward


def make_causal(d_model=8, heads=2, d_ff=16, n_layers=2, max_distance=5, seed=0, memory_span=None
                ) -> CausalTransformer:
    torch.manual_seed(seed)
    layer = CausalTransformerLayer(d_model=d_model, attn=CausalAttention(heads, d_model, 0.0, max_distance),
                                   feed_forward=FeedForward(d_model, d_ff, 0.0), dropout_prob=0.0)
    model = CausalTransformer(layer, n_layers, memory_span=memory_span).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def naive_forward(model: CausalTransformer, x: torch.Tensor, span=None) -> torch.Tensor:
    """
    Attention written out one query and one key at a time, with the distance table lookups spelled out; with `span`
    a query at `i` sees keys `max(0, i - span) .. i`.
    """
    seq_len, batch_size, d_model = x.shape
    for layer in model.layers:
        a = layer.attn
        z = layer.norm_self_attn(x)
        q, k, v = a.query(z), a.key(z), a.value(z)
        out = torch.zeros_like(q)
        for i in range(seq_len):
            scores = []
            first = 0 if span is None else max(0, i - span)
            for j in range(first, i + 1):
                row = min(i - j, a.max_distance - 1)
                scores.append(((q[i] + a.query_pos_bias) * k[j]).sum(-1) + (q[i] * a.key_pos_embeddings[row]).sum(-1)
                              + a.key_pos_bias[row])
            weights = torch.softmax(torch.stack(scores) / math.sqrt(a.d_k), dim=0)
            out[i] = (weights[..., None] * v[first:i + 1]).sum(0)
        x = x + a.output(out.reshape(seq_len, batch_size, d_model))
        x = x + layer.feed_forward(layer.norm_ff(x))
    return model.norm(x)


def test_matches_naive_reference():
    model = make_causal()
    x = torch.randn(9, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), naive_forward(model, x), rtol=1e-10, atol=1e-10)


def test_chunked_equals_full_and_state():
    model = make_causal()
    x = torch.randn(11, 2, 8, dtype=torch.float64)
    full = model(x)
    state, outs = None, []
    for a, b in [(0, 4), (4, 5), (5, 11)]:
        out, state = model(x[a:b], state=state, return_state=True)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs), full, rtol=1e-10, atol=1e-10)
    assert state.offset == 11
    assert len(state.keys) == 2 and state.keys[0].shape == (11, 2, 2, 4)
    detached = state.detach()
    assert not detached.keys[0].requires_grad and detached.offset == 11


def test_causality():
    model = make_causal()
    x = torch.randn(8, 2, 8, dtype=torch.float64)
    y = x.clone()
    y[5] += torch.randn(2, 8, dtype=torch.float64)
    out_x, out_y = model(x), model(y)
    torch.testing.assert_close(out_x[:5], out_y[:5], rtol=0, atol=1e-12)
    assert (out_x[5:] - out_y[5:]).abs().max() > 1e-3


def test_errors():
    model = make_causal()
    with pytest.raises(ValueError, match='x must be'):
        model(torch.randn(4, 2, 7, dtype=torch.float64))
    _, state = model(torch.randn(4, 2, 8, dtype=torch.float64), return_state=True)
    with pytest.raises(ValueError, match='batch size'):
        model(torch.randn(1, 3, 8, dtype=torch.float64), state=state)
    with pytest.raises(TypeError, match='CausalState'):
        model(torch.randn(1, 2, 8, dtype=torch.float64), state=(1, 2))
    with pytest.raises(ValueError, match='heads'):
        CausalAttention(3, 8)
    assert isinstance(state, CausalState)


@pytest.mark.parametrize('span', [1, 3, 20])
def test_window_matches_naive_reference(span):
    # span 20 is longer than the sequence: the unlimited model; max_distance=5 < span clips distances
    model = make_causal(memory_span=span)
    x = torch.randn(10, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), naive_forward(model, x, span), rtol=1e-10, atol=1e-10)
    if span < 9:
        assert (model(x) - naive_forward(model, x)).abs().max() > 1e-3, 'the window changes the result'
    assert model.memory_span == span and all(layer.attn.memory_span == span for layer in model.layers)


@pytest.mark.parametrize('chunks', [[(0, 13)], [(0, 4), (4, 5), (5, 13)], [(i, i + 1) for i in range(13)]])
def test_window_chunked_equals_full_and_cache_is_bounded(chunks):
    span = 3
    model = make_causal(memory_span=span)
    x = torch.randn(13, 2, 8, dtype=torch.float64)
    full = naive_forward(model, x, span)
    state, outs = None, []
    for a, b in chunks:
        out, state = model(x[a:b], state=state, return_state=True)
        outs.append(out)
        # The cache holds the last `span` positions at most, for every layer
        assert all(k.shape[0] == min(span, b) and v.shape[0] == min(span, b)
                   for k, v in zip(state.keys, state.values))
        # Carried Transformer-XL style: detached between chunks
        state = state.detach()
    torch.testing.assert_close(torch.cat(outs), full, rtol=1e-10, atol=1e-10)
    assert state.offset == 13


def test_window_receptive_field():
    # Two layers of span 3: position t depends on tokens t - 6 .. t and on nothing older
    model = make_causal(memory_span=3)
    x = torch.randn(12, 1, 8, dtype=torch.float64)
    y = x.clone()
    y[2] += torch.randn(1, 8, dtype=torch.float64)
    diff = (model(x) - model(y)).abs().amax(dim=(1, 2))
    assert (diff[:2] == 0).all() and (diff[2:9] > 1e-6).all() and (diff[9:] == 0).all(), diff


def test_window_errors():
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match='memory_span'):
            make_causal(memory_span=bad)
        with pytest.raises(ValueError, match='memory_span'):
            CausalAttention(2, 8, memory_span=bad)
