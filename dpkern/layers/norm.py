"""nn.LayerNorm, torch.nn.RMSNorm and the Llama / Qwen2 / Qwen3 / Mistral RMSNorm modules.

Each runs as normalisation without affine parameters (autograd differentiates it as usual) followed
by a dpkern elementwise affine y = x̂ ⊙ w (+ b). The affine's backward instantiates the per-sample
gradients Σ_t g_t ⊙ x̂_t and Σ_t g_t, (B, n) each: O(B·n) values, far below one weight matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpkern.layers._site import Site, function_apply
from dpkern.layers.uses import PerSampleUse

# Hugging Face RMSNorm classes computing weight * (x * rsqrt(mean(x²) + eps)).to(input_dtype).
HF_RMSNORM_NAMES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")


class _AffineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xhat, weight, bias, site):
        ctx.site = site
        ctx.save_for_backward(xhat, weight)
        y = weight * xhat
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, gy):
        xhat, weight = ctx.saved_tensors
        site = ctx.site
        gx = (gy * weight).to(xhat.dtype) if ctx.needs_input_grad[0] else None
        if xhat.dim() < 2:
            raise RuntimeError(f"{site.path}: input needs a batch dimension first")
        bsz, n = xhat.shape[0], weight.numel()
        acc = torch.float64 if gy.dtype == torch.float64 else torch.float32
        g = gy.reshape(bsz, -1, n)
        if site.wants("weight"):
            pw = (g.to(acc) * xhat.reshape(bsz, -1, n).to(acc)).sum(dim=1)
            site.record("weight", PerSampleUse(pw.view(bsz, *weight.shape), site.path))
        if site.wants("bias"):
            site.record("bias", PerSampleUse(g.sum(dim=1, dtype=acc).view(bsz, *weight.shape),
                                             site.path))
        return gx, None, None, None


_affine_apply = function_apply(_AffineFn)


def layer_norm_forward(module: torch.nn.LayerNorm, site: Site, x: torch.Tensor) -> torch.Tensor:
    xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return _affine_apply(xhat, module.weight, module.bias, site)


def rms_norm_forward(module: torch.nn.RMSNorm, site: Site, x: torch.Tensor) -> torch.Tensor:
    xhat = F.rms_norm(x, module.normalized_shape, None, module.eps)
    return _affine_apply(xhat, module.weight, None, site)


def hf_rms_norm_forward(module, site: Site, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    h = hidden_states.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return _affine_apply(h.to(input_dtype), module.weight, None, site)
