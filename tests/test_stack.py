"""Tests of `Stack` / `StackFunction`: values, gradients (gradcheck, reentrancy), growth, memory spans and misuse."""

import pytest
import torch

from labml_nn.transformers.feedback import Stack, StackFunction


def _run(values, span=None, max_len=0):
    """Append `values` one by one and combine every view with fixed weights, like attention does."""
    stack = Stack(max_len, memory_span=span)
    total = 0
    for n, v in enumerate(values):
        view = stack.append(n, v)
        weights = torch.arange(1, view.shape[0] + 1, dtype=v.dtype).view(-1, *([1] * v.dim())) * (n + 1)
        total = total + (view * weights).sin().sum()
    return total


def _naive(values, span=None):
    total = 0
    for n in range(len(values)):
        lo = 0 if span is None else max(0, n + 1 - span)
        view = torch.stack(values[lo:n + 1])
        weights = torch.arange(1, view.shape[0] + 1, dtype=view.dtype).view(-1, *([1] * (view.dim() - 1))) * (n + 1)
        total = total + (view * weights).sin().sum()
    return total


@pytest.mark.parametrize('span', [None, 3])
def test_views_equal_torch_stack(span):
    values = [torch.randn(2, 3) for _ in range(40)]
    stack = Stack(2, memory_span=span)
    for n, v in enumerate(values):
        view = stack.append(n, v)
        lo = 0 if span is None else max(0, n + 1 - span)
        assert torch.equal(view, torch.stack(values[lo:n + 1]))
    assert torch.equal(stack.get(), view)


@pytest.mark.parametrize('span', [None, 3])
def test_gradcheck_stack(span):
    # 12 appends into a buffer that starts with room for 2: it has to grow (and, with a span, drop rows)
    values = tuple(torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(12))
    assert torch.autograd.gradcheck(lambda *v: _run(v, span, max_len=2), values)


@pytest.mark.parametrize('span', [None, 3])
def test_gradients_equal_naive(span):
    values = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(20)]
    got = torch.autograd.grad(_run(values, span), values)
    want = torch.autograd.grad(_naive(values, span), values)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_backward_is_reentrant():
    values = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(10)]
    loss = _run(values)
    first = torch.autograd.grad(loss, values, retain_graph=True)
    second = torch.autograd.grad(loss, values, retain_graph=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # A backward over part of the inputs, then over all of them again
    torch.autograd.grad(loss, values[5:], retain_graph=True)
    third = torch.autograd.grad(loss, values)
    for a, c in zip(first, third):
        assert torch.equal(a, c)


def test_views_are_not_copies_and_survive_later_appends():
    stack = Stack(8)
    v0 = stack.append(0, torch.ones(2))
    v1 = stack.append(1, torch.full((2,), 2.0))
    # Same memory, no copy
    assert v1.untyped_storage().data_ptr() == v0.untyped_storage().data_ptr()
    # Writing row 2 leaves the earlier views valid for autograd (own version counters)
    x = torch.ones(2, requires_grad=True)
    view = stack.append(2, x * 3)
    y = (view * view).sum()
    stack.append(3, torch.zeros(2))
    y.backward()
    torch.testing.assert_close(x.grad, torch.full((2,), 18.0))


def test_out_of_order_append_is_an_error():
    stack = Stack()
    stack.append(0, torch.zeros(2))
    with pytest.raises(ValueError, match="in order"):
        stack.append(2, torch.zeros(2))
    with pytest.raises(ValueError, match="in order"):
        StackFunction.apply(torch.zeros(2, requires_grad=True), stack, 0)


def test_mismatched_entry_is_an_error():
    stack = Stack()
    stack.append(0, torch.zeros(2))
    with pytest.raises(ValueError, match="same shape"):
        stack.append(1, torch.zeros(3))
    with pytest.raises(TypeError):
        stack.append(1, [0.0, 0.0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_len"):
        Stack(-1)
    with pytest.raises(ValueError, match="memory_span"):
        Stack(memory_span=0)


def test_fork_shares_and_copies_on_write():
    stack = Stack(4)
    for n in range(3):
        stack.append(n, torch.full((1,), float(n)))
    fork = stack.fork()
    assert fork.length == fork.frozen == 3
    # Both continue: neither overwrites the other's entry 3
    a = stack.append(3, torch.full((1,), 10.0))
    b = fork.append(3, torch.full((1,), 20.0))
    assert a[:, 0].tolist() == [0, 1, 2, 10]
    assert b[:, 0].tolist() == [0, 1, 2, 20]


def test_frozen_rows_get_no_gradient():
    stack = Stack()
    old = torch.ones(2, requires_grad=True)
    stack.append(0, old * 1)
    fork = stack.fork()
    new = torch.ones(2, requires_grad=True)
    view = fork.append(1, new * 1)
    (view * 2).sum().backward()
    assert old.grad is None
    torch.testing.assert_close(new.grad, torch.full((2,), 2.0))


@pytest.mark.parametrize('span', [None, 3])
def test_stacking_on_another_axis(span):
    # Entries [2, 3] stacked on axis 1: views [2, n, 3]; values and gradients as torch.stack(..., dim=1)
    values = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(9)]
    stack = Stack(2, memory_span=span, dim=1)
    total, ref = 0, 0
    for n, v in enumerate(values):
        view = stack.append(n, v)
        lo = 0 if span is None else max(0, n + 1 - span)
        want = torch.stack(values[lo:n + 1], dim=1)
        assert torch.equal(view, want)
        w = torch.arange(1, view.shape[1] + 1, dtype=v.dtype).view(1, -1, 1) * (n + 1)
        total = total + (view * w).sin().sum()
        ref = ref + (want * w).sin().sum()
    for g, r in zip(torch.autograd.grad(total, values), torch.autograd.grad(ref, values)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *v: _run_dim1(v, span), tuple(values[:6]))


def _run_dim1(values, span):
    stack = Stack(1, memory_span=span, dim=1)
    return sum(stack.append(n, v).sin().sum() * (n + 1) for n, v in enumerate(values))
