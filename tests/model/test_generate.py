"""
Tests of cached generation, `AutoregressiveModel.generate`: it must pick the same tokens as re-running the
model over the whole sequence for every token (the slow, obviously correct way), sample reproducibly from the
right distribution, and reject bad arguments with clear errors.
"""

import pytest
import torch
from conftest import make_transformer
from reference import greedy_by_recomputation

from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel, sample_token

N_VOCAB = 11
VARIANTS = ["weighted", "kv"]


def make_model(variant: str, *, memory_span=None, seed: int = 0, memory_norm: bool = False) -> AutoregressiveModel:
    """
    A tiny language model in float64, with dropout (so that eval mode matters), a position table shorter
    than the generated text, and random values in every parameter.
    """
    transformer = make_transformer(variant, d_model=16, heads=2, d_ff=32, n_layers=2, dropout=0.2, max_distance=6,
                                   memory_span=memory_span, seed=seed, memory_norm=memory_norm)
    return AutoregressiveModel(N_VOCAB, 16, transformer).double()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("memory_span, memory_norm", [(None, False), (5, False), (5, True)])
def test_greedy_equals_recomputation(variant, memory_span, memory_norm, device):
    model = make_model(variant, memory_span=memory_span, memory_norm=memory_norm).to(device)
    prompt = torch.randint(N_VOCAB, (4, 3), device=device)
    # 20 new tokens: distances beyond the position table (6) and the memory span (5)
    expected = greedy_by_recomputation(model, prompt, 20)
    got = model.generate(prompt, 20, temperature=0)
    assert got.dtype == torch.long and got.shape == (24, 3)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_token_prompt_and_zero_new_tokens(variant):
    model = make_model(variant)
    prompt = torch.tensor([[3, 7]])
    assert torch.equal(model.generate(prompt, 9, temperature=0), greedy_by_recomputation(model, prompt, 9))
    out = model.generate(prompt, 0)
    assert torch.equal(out, prompt) and out.dtype == torch.long
    # int32 prompts are accepted; the result is always int64
    out = model.generate(prompt.int(), 5, temperature=0)
    assert out.dtype == torch.long and torch.equal(out, model.generate(prompt, 5, temperature=0))


@pytest.mark.parametrize("variant", VARIANTS)
def test_seeded_generator_is_reproducible(variant):
    model = make_model(variant)
    prompt = torch.randint(N_VOCAB, (3, 4))
    a = model.generate(prompt, 30, temperature=1.5, rng=torch.Generator().manual_seed(7))
    # The global random state must not matter when a generator is given
    torch.manual_seed(123)
    b = model.generate(prompt, 30, temperature=1.5, rng=torch.Generator().manual_seed(7))
    c = model.generate(prompt, 30, temperature=1.5, rng=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:3], prompt)
    # Without a generator, torch.manual_seed makes it reproducible
    torch.manual_seed(5)
    d = model.generate(prompt, 30, temperature=1.5)
    torch.manual_seed(5)
    assert torch.equal(d, model.generate(prompt, 30, temperature=1.5))


@pytest.mark.parametrize("variant", VARIANTS)
def test_top_k_one_is_greedy(variant):
    model = make_model(variant)
    prompt = torch.randint(N_VOCAB, (2, 3))
    greedy = greedy_by_recomputation(model, prompt, 15)
    sampled = model.generate(prompt, 15, temperature=0.7, top_k=1, rng=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


def test_top_k_samples_only_the_k_most_likely():
    model = make_model("kv")
    prompt = torch.randint(N_VOCAB, (2, 8))
    out = model.generate(prompt, 12, temperature=3.0, top_k=3, rng=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        logits = model(out[:-1])
    # The token at position t + 1 is among the 3 largest logits at position t
    top3 = logits.topk(3, dim=-1).indices[1:]
    assert (top3 == out[2:, :, None]).any(dim=-1).all()
    # A large temperature over all tokens does leave the top 3 somewhere
    wide = model.generate(prompt, 12, temperature=3.0, rng=torch.Generator().manual_seed(1))
    with torch.no_grad():
        top3 = model(wide[:-1]).topk(3, dim=-1).indices[1:]
    assert not (top3 == wide[2:, :, None]).any(dim=-1).all()


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, None), (2.0, 4)])
def test_sampling_distribution(temperature, top_k):
    """Frequencies of many one-token draws match $\\mathrm{softmax}(z / \\tau)$ over the top k."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=torch.float64)
    n = 40_000
    tokens = sample_token(logits.expand(n, -1), temperature, top_k, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=6).double() / n
    expected = logits / temperature
    if top_k is not None:
        expected[top_k:] = -float("inf")
    expected = torch.softmax(expected, dim=0)
    # Four standard deviations of a binomial frequency
    assert ((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-12).all(), (freq, expected)


def test_tiny_temperature_is_greedy_without_overflow():
    logits = torch.tensor([[1e3, 1e3 - 1, -5.0], [0.0, 0.5, 0.4]])
    tokens = sample_token(logits, 1e-30, None, torch.Generator().manual_seed(0))
    assert tokens.tolist() == [0, 1]


def test_temperature_below_float32s_range_is_the_greedy_limit():
    """1e-46 becomes 0 in float32: the limit of tau -> 0 (the maximum; a fair draw among tied maxima)."""
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.5, 0.4, 0.1]])
    tokens = sample_token(logits.repeat(500, 1), 1e-46, None, torch.Generator().manual_seed(0)).view(500, 2)
    assert set(tokens[:, 0].tolist()) == {1, 2} and set(tokens[:, 1].tolist()) == {1}
    assert sample_token(logits, 1e-46, 2, torch.Generator().manual_seed(0))[1].item() == 1
    # Half precision: 1e-8 is below its range too
    assert sample_token(logits[1:].half(), 1e-8, None).tolist() == [1]
    # A model in float32 generates the greedy text
    model = make_model("kv").float()
    prompt = torch.randint(N_VOCAB, (3, 2))
    assert torch.equal(model.generate(prompt, 8, temperature=1e-46), model.generate(prompt, 8, temperature=0))


def test_generate_does_not_train_or_leak():
    model = make_model("kv")
    model.train()
    model.transformer.layers[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.randint(N_VOCAB, (3, 2))
    out = model.generate(prompt, 10, temperature=0)
    # Each submodule's mode is back as it was; parameters untouched; the result is an ordinary tensor
    assert model.training and model.transformer.training and not model.transformer.layers[0].training
    assert model.transformer.layers[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not out.requires_grad and not out.is_inference()
    out[0] = 0
    # A second call gives the same tokens (no state kept), and training still works after it
    assert torch.equal(model.generate(prompt, 10, temperature=0)[3:], out[3:])
    loss = model(out[:-1]).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=2.0), ValueError, "max_new_tokens must be an int >= 0"),
    (dict(temperature=-0.1), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number >= 0"),
    (dict(top_k=0), ValueError, r"top_k must be None \(no limit\) or an int >= 1"),
    (dict(top_k=-3), ValueError, "top_k must be None"),
    (dict(top_k=2.5), ValueError, "top_k must be None"),
    (dict(rng=123), TypeError, "rng must be a torch.Generator"),
])
def test_bad_arguments(kwargs, error, match):
    model = make_model("kv")
    args = dict(max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        model.generate(torch.zeros(2, 1, dtype=torch.long), args.pop("max_new_tokens"), **args)


@pytest.mark.parametrize("prompt,error,match", [
    (torch.zeros(0, 2, dtype=torch.long), ValueError, r"prompt must have shape \[seq_len >= 1, batch_size >= 1\]"),
    (torch.zeros(3, 0, dtype=torch.long), ValueError, r"prompt must have shape"),
    (torch.zeros(3, dtype=torch.long), ValueError, r"prompt must have shape"),
    (torch.tensor([[0], [N_VOCAB]]), ValueError, rf"outside the vocabulary \[0, {N_VOCAB - 1}\]"),
    (torch.tensor([[-1], [2]]), ValueError, "outside the vocabulary"),
    (torch.zeros(2, 1), TypeError, "prompt must hold integer token ids"),
    ([[1, 2]], TypeError, r"prompt must be a LongTensor \[seq_len, batch_size\]"),
])
def test_bad_prompt(prompt, error, match):
    model = make_model("weighted")
    with pytest.raises(error, match=match):
        model.generate(prompt, 3)


def test_parallel_baseline_with_key_value_cache():
    """`generate()` only needs the state API: the parallel baseline's key/value cache gives the same tokens."""
    causal = pytest.importorskip("labml_nn.transformers.causal")
    from labml_nn.transformers.feed_forward import FeedForward
    torch.manual_seed(0)
    layer = causal.CausalTransformerLayer(d_model=16, attn=causal.CausalAttention(2, 16, 0.2, max_distance=6),
                                          feed_forward=FeedForward(16, 32, 0.2), dropout_prob=0.2)
    model = AutoregressiveModel(N_VOCAB, 16, causal.CausalTransformer(layer, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompt = torch.randint(N_VOCAB, (4, 3))
    assert torch.equal(model.generate(prompt, 20, temperature=0), greedy_by_recomputation(model, prompt, 20))
    a = model.generate(prompt, 20, top_k=3, rng=torch.Generator().manual_seed(2))
    assert torch.equal(a, model.generate(prompt, 20, top_k=3, rng=torch.Generator().manual_seed(2)))


def test_model_built_under_inference_mode_generates():
    # Parameters created under inference mode have no version counters; the inference caches must cope
    from conftest import make_transformer

    from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel
    with torch.inference_mode():
        model = AutoregressiveModel(5, 8, make_transformer('kv', dtype=torch.float32))
        out = model.generate(torch.zeros(2, 1, dtype=torch.long), 4, temperature=0)
    assert out.shape == (6, 1)
