"""nn.Linear (any leading dims) and Hugging Face Conv1D (GPT-2): y = x Wᵀ + b / y = x W + b.

Backward computes grad_input as usual, leaves (x, grad_out) on the tape for the per-sample norm and
the deferred clipped weight gradient, and returns no weight gradient: autograd's own weight-grad
GEMM never runs. The bias's per-sample gradients Σ_t g_t (B, p) are instantiated (cheap).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpkern.layers._site import Site, as_bt, function_apply
from dpkern.layers.uses import LinearUse, PerSampleUse


def _bias_use(site: Site, g: torch.Tensor) -> None:
    if site.wants("bias"):
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        site.record("bias", PerSampleUse(g.sum(dim=1, dtype=acc), site.path))


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, site, token):
        ctx.site, ctx.token = site, token
        weight = _autocast_input(weight)  # the copy autocast would make; backward reuses it
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        site = ctx.site
        gx = None
        if ctx.needs_input_grad[0]:  # (.to on a Parameter is slow even when it returns it)
            gx = gy.matmul(weight if weight.dtype == gy.dtype else weight.to(gy.dtype))
        g = as_bt(gy, "grad_output", site.path)
        if site.wants("weight"):
            a = site.tape.shared_input(ctx.token, as_bt(x, "input", site.path).to(g.dtype))
            site.record("weight", LinearUse(a, g, site.path))
        _bias_use(site, g)
        return gx, None, None, None, None


class _Conv1DFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, site):
        ctx.site = site
        weight = _autocast_input(weight)
        ctx.save_for_backward(x, weight)
        y = x.reshape(-1, x.shape[-1]) @ weight
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[1])

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        site = ctx.site
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul((weight if weight.dtype == gy.dtype else weight.to(gy.dtype)).t())
        g = as_bt(gy, "grad_output", site.path)
        if site.wants("weight"):  # weight (d, p): gradient Σ_t x_tᵀ g_t, a LinearUse with roles swapped
            site.record("weight", LinearUse(g, as_bt(x, "input", site.path).to(g.dtype), site.path))
        _bias_use(site, g)
        return gx, None, None, None


_linear_apply = function_apply(_LinearFn)
_conv1d_apply = function_apply(_Conv1DFn)


# Whether autocast is on for any device type (one C call; torch.utils.checkpoint uses it too). A
# torch without it gets the full check on every call.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, the input (or weight) as the matmul will see it (cast once, here): the tape
    then keeps the low-precision copy that autocast itself would save, not the fp32 input, and the
    backward's grad_input GEMM reuses the weight's copy, as autograd does without dpkern (it used
    to cast every weight again there: 113 more casts per step of the 1B Llama). Layers reading one
    input (q/k/v) each cast it, as autocast does; `GradTape.cast_token` names the casts of one
    tensor so that the tape keeps one of them and the norms share its Gram."""
    if not _any_autocast():  # the common case, without reading x's device (slow on a Parameter)
        return x
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if x.dtype != dt and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return x.to(dt)
    return x


def linear_forward(module: torch.nn.Linear, site: Site, x: torch.Tensor) -> torch.Tensor:
    xc = _autocast_input(x)
    token = site.tape.cast_token(x, xc.dtype) if xc is not x else None
    return _linear_apply(xc, module.weight, module.bias, site, token)


def conv1d_forward(module, site: Site, x: torch.Tensor) -> torch.Tensor:
    return _conv1d_apply(_autocast_input(x), module.weight, module.bias, site)
