"""
Tests of compiled decoding (static_step.py, `TokenDecoder`): the decoder's logits and states are the model's, token
by token, for both variants, with and without a memory span, across the cache buffer's growth; `generate()` uses it
and draws the same tokens as without compiling; and it stands aside where it does not apply.
"""

import pytest
import torch
from conftest import make_transformer
from torch import nn

from labml_nn.transformers.feedback import compiled
from labml_nn.transformers.feedback.autoregressive import AutoregressiveModel

needs_cxx = pytest.mark.skipif(compiled.find_cxx() is None,
                               reason="no C++ compiler found: torch.compile cannot build the step on the CPU")

# The sizes of test_compiled.py, so that the two files' tests share compiled code where they can
SIZES = dict(d_model=8, heads=2, d_ff=16, n_layers=2, max_distance=6, memory_norm=True)
N_VOCAB = 11


def language_models(kind: str, **kwargs):
    """A language model around a compiled transformer, and its eager twin with the same weights (float64)."""
    lm = AutoregressiveModel(N_VOCAB, SIZES['d_model'], make_transformer(kind, compile=True, **SIZES, **kwargs))
    eager = AutoregressiveModel(N_VOCAB, SIZES['d_model'], make_transformer(kind, **SIZES, **kwargs))
    lm, eager = lm.double(), eager.double()
    eager.load_state_dict(lm.state_dict())
    return lm.eval(), eager.eval()


@needs_cxx
@pytest.mark.parametrize('kind', ['weighted', 'kv'])
@pytest.mark.parametrize('span, batch', [(None, 1), (3, 2)])
def test_decoder_logits_and_states_are_the_models(kind, span, batch):
    """
    Token by token past the buffer's first capacity (16 slots), the decoder's logits are the eager model's, and a
    state it made continues as the model's own.
    """
    lm, eager = language_models(kind, memory_span=span)
    tokens = torch.randint(N_VOCAB, (24, batch), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        decoder = lm.transformer.token_decoder(lm.src_embed, lm.generator, tokens)
        assert decoder is not None
        _, state = lm(tokens[:3], return_state=True)
        _, expected_state = eager(tokens[:3], return_state=True)
        for t in range(3, 20):
            logits, state = decoder(tokens[t], state)
            expected, expected_state = eager(tokens[t:t + 1], state=expected_state, return_state=True)
            torch.testing.assert_close(logits, expected[-1])
            assert state.n_steps == expected_state.n_steps == t + 1
        torch.testing.assert_close(state.visible, expected_state.visible)
        # The decoder's state, continued by the model (several tokens in one call)
        torch.testing.assert_close(lm(tokens[20:], state=state), eager(tokens[20:], state=expected_state))


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize('kind', ['weighted', 'kv'])
def test_generate_draws_the_same_tokens_as_without_compiling(kind):
    """Sampling from the same generator picks the same tokens: the decoder changes how logits are made, not them."""
    lm, eager = language_models(kind)
    prompt = torch.tensor([[1, 5], [4, 0], [2, 2]])
    drawn = [model.generate(prompt, 30, rng=torch.Generator().manual_seed(7)) for model in (lm, eager)]
    assert torch.equal(drawn[0], drawn[1])
    assert not torch.equal(drawn[0][3:, 0], drawn[0][3:, 1])


def test_no_decoder_where_it_does_not_apply():
    """Without `compile=`, under autocast, or around other modules, `generate()` runs the model's modules."""
    like = torch.zeros(1)
    plain = AutoregressiveModel(N_VOCAB, 8, make_transformer('kv', dtype=torch.float32, **SIZES))
    assert plain.transformer.token_decoder(plain.src_embed, plain.generator, like) is None
    lm = AutoregressiveModel(N_VOCAB, 8, make_transformer('kv', compile=True, dtype=torch.float32, **SIZES))
    assert lm.transformer.token_decoder(lm.src_embed, lm.generator, like) is not None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert lm.transformer.token_decoder(lm.src_embed, lm.generator, like) is None
    head = nn.Sequential(nn.Linear(8, N_VOCAB))
    assert lm.transformer.token_decoder(lm.src_embed, head, like) is None
    assert lm.transformer.token_decoder(nn.Embedding(N_VOCAB, 8, max_norm=1.0), lm.generator, like) is None
