"""layers._site.function_apply: the wrapped layers' Functions applied through the C++ apply give
what Function.apply gives (values, gradients, the Function's own backward), and defer to
Function.apply where its Python wrapper does work (functorch transforms, setup_context)."""
import pytest
import torch

from dpkern.layers._site import function_apply


class _Scale(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x, w, tag):
        ctx.tag = tag
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        _Scale.calls += 1
        assert ctx.tag == "t"
        return gy * w * 3.0, None, None  # not the true gradient: shows this backward ran


def test_same_values_and_backward_as_apply():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    fast = function_apply(_Scale)
    y1, y2 = _Scale.apply(x, w, "t"), fast(x, w, "t")
    assert torch.equal(y1, y2) and type(y1.grad_fn) is type(y2.grad_fn)
    before = _Scale.calls
    (g1,) = torch.autograd.grad(y1.sum(), x)
    (g2,) = torch.autograd.grad(y2.sum(), x)
    assert _Scale.calls == before + 2
    assert torch.equal(g1, g2) and torch.equal(g2, (3.0 * w).expand(5, 3))
    assert w.grad is None


def test_functorch_transform_takes_function_apply():
    fast = function_apply(_Scale)
    w = torch.randn(3)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: _Scale.apply(x, w, "t").sum())(torch.randn(3))
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: fast(x, w, "t").sum())(torch.randn(3))


def test_setup_context_functions_refused():
    class WithSetup(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g
    with pytest.raises(TypeError, match="setup_context"):
        function_apply(WithSetup)
