"""
The fused loop's step functions compiled by `torch.compile` (`fused_forward(..., steps=compiled_steps())`, fused.py
"One step, one function"): the same outputs and gradients as the eager step functions, with dropout, a memory span,
carried state and `memory_norm`. The eager functions themselves are held to the float64 reference by the fused-loop
tests.

Compiling is slow on two cores (a graph per branch and per kind of size the compiler meets: a minute or two for this
case): the model is tiny and runs two short calls.
"""

import pytest
import torch
from conftest import make_transformer

from labml_nn.transformers.feedback import compiled
from labml_nn.transformers.feedback.fused import EAGER_STEPS, LoopSteps, compiled_steps, fused_forward

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(compiled.find_cxx() is None,
                                 reason="no C++ compiler found: torch.compile cannot build the steps on the CPU")]


@pytest.fixture
def steps():
    """The step functions compiled afresh (dynamo keeps compiled code per function: other tests' is dropped)."""
    torch._dynamo.reset()
    yield compiled_steps()
    torch._dynamo.reset()


def _run(model, steps: LoopSteps, x: torch.Tensor):
    """Two calls, the second continuing the first's state; the outputs and every gradient of a fixed loss."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    # The same dropout masks in both runs: the loop draws their seed from the global generator
    torch.manual_seed(3)
    first, state = fused_forward(model, x[:5], None, True, steps=steps)
    second = fused_forward(model, x[5:], state, False, steps=steps)
    out = torch.cat([first, second])
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


def test_compiled_steps_equal_eager_steps(steps):
    # One case that takes every branch a step has but autocast's (each case compiles for minutes on two cores):
    # per-layer keys and values, dropout everywhere, a memory span (slots leave the window), carried state and
    # normalised memory
    model = make_transformer('weighted', dtype=torch.float32, dropout=0.2, memory_span=3, memory_norm=True)
    model.train()
    x = torch.randn(9, 2, 8, generator=torch.Generator().manual_seed(1))
    expected = _run(model, EAGER_STEPS, x)
    got = _run(model, steps, x)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
