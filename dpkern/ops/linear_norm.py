"""Per-sample squared Frobenius norm of a Linear layer's weight gradient, never forming it in HBM.

For y = a Wᵀ (a: (B, T, d), y and its grad g: (B, T, p)) sample i's weight gradient is G_i = g_iᵀ a_i
(p × d). Two exact ways to get ‖G_i‖²_F (kernels/README_persample.md has the derivation):

* "ghost":        ⟨a_i a_iᵀ, g_i g_iᵀ⟩_F — two T × T Grams; ~2T²(d+p) FLOPs (half with symmetry).
* "instantiate":  form G_i tile by tile on chip, square and sum; ~2Tdp FLOPs.
* "auto":         whichever the FLOP model says is cheaper for this (T, d, p) and backend.

All backends compute in fp32 (or wider for float64 input), whatever the input dtype.
"""
from __future__ import annotations

import torch

from dpkern import _alloc
from dpkern.backend import resolve_backend
from dpkern.ops._persample import (check_device, check_same, check_tensor, exact_fp32_matmul,
                                   sample_chunks)

METHODS = ("auto", "ghost", "instantiate")
_IMPLEMENTED = ("triton", "torch")


def linear_norm_flops(seq: int, d: int, p: int, method: str, backend: str = "triton") -> int:
    """FLOP model of one sample's norm. The Triton ghost kernel visits only the upper triangle of the
    symmetric (t, s) plane, so it does about half of the 2T²(d+p) of a dense Gram product."""
    if method == "ghost":
        full = 2 * seq * seq * (d + p)
        return full // 2 if backend == "triton" else full
    if method == "instantiate":
        return 2 * seq * d * p
    raise ValueError(f"method must be 'ghost' or 'instantiate', got {method!r}")


def choose_method(seq: int, d: int, ps, backend: str = "triton") -> str:
    """'ghost' or 'instantiate' for inputs of width d feeding outputs of widths ps (one or many that
    share the input: the input Gram is then paid once)."""
    ps = [ps] if isinstance(ps, int) else list(ps)
    ghost = linear_norm_flops(seq, d, 0, "ghost", backend) + sum(
        linear_norm_flops(seq, 0, p, "ghost", backend) for p in ps)
    inst = sum(linear_norm_flops(seq, d, p, "instantiate") for p in ps)
    return "ghost" if ghost <= inst else "instantiate"


def _check(op, a, gs, method):
    check_tensor(op, "a", a, 3)
    for k, g in enumerate(gs):
        name = "g" if len(gs) == 1 else f"gs[{k}]"
        check_tensor(op, name, g, 3)
        check_same(op, "batch and sequence sizes", {"a.shape[:2]": tuple(a.shape[:2]),
                                                    f"{name}.shape[:2]": tuple(g.shape[:2])})
        check_device(op, {"a": a, name: g})
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")


def _torch_norms(a: torch.Tensor, gs: list, method: str) -> list:
    """Torch backend: batched matmuls in exact fp32, chunked over samples to bound memory."""
    bsz, seq, d = a.shape
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    outs = [torch.empty(bsz, dtype=acc, device=a.device) for _ in gs]
    if method == "ghost":
        per_sample = 8 * seq * seq + 4 * seq * (d + max(g.shape[2] for g in gs))
    else:
        per_sample = 4 * max(g.shape[2] for g in gs) * (d + seq) + 4 * seq * d
    with exact_fp32_matmul(a.device):
        for sl in sample_chunks(bsz, per_sample):
            a_c = a[sl].to(acc)
            gram_a = a_c @ a_c.transpose(1, 2) if method == "ghost" else None
            for out, g in zip(outs, gs):
                g_c = g[sl].to(acc)
                if method == "ghost":
                    out[sl] = (gram_a * (g_c @ g_c.transpose(1, 2))).sum(dim=(1, 2))
                else:
                    out[sl] = (g_c.transpose(1, 2) @ a_c).square().sum(dim=(1, 2))
    return outs


def linear_norm_sq_shared(a: torch.Tensor, gs: list, *, method: str = "auto",
                          backend: str | None = None) -> list:
    """Per-sample ‖g_kᵀ a‖²_F for several layers that read the same input (q/k/v, gate/up).

    Args:
        a: (B, T, d) the shared input; float32 / float16 / bfloat16.
        gs: list of (B, T, p_k) output gradients, any float dtypes, on a's device.
        method: "auto" | "ghost" | "instantiate" (one choice for the group; ghost computes a's
            Gram once for all of them).
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").
    Returns:
        list of (B,) float32 tensors, one per entry of gs.

    Example:
        >>> a = torch.randn(2, 5, 8); q, k = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
        >>> [n.shape for n in linear_norm_sq_shared(a, [q, k])]
        [torch.Size([2]), torch.Size([2])]
    """
    op = "linear_norm_sq_shared"
    if not isinstance(gs, (list, tuple)) or not gs:
        raise TypeError(f"{op}: gs must be a non-empty list of tensors")
    gs = list(gs)
    _check(op, a, gs, method)
    be = resolve_backend(backend, a.device, op=op, implemented=_IMPLEMENTED,
                         auto_order=("triton",))
    bsz, seq, d = a.shape
    if method == "auto":
        method = choose_method(seq, d, [g.shape[2] for g in gs], be)
    if be == "torch" or bsz == 0 or seq == 0:
        if bsz == 0 or seq == 0:
            return [torch.zeros(bsz, dtype=torch.float32, device=a.device) for _ in gs]
        return _torch_norms(a, gs, method)
    outs = [_alloc.empty(bsz, dtype=torch.float32, device=a.device) for _ in gs]
    if method == "ghost":
        from dpkern.kernels.ghost_norm import ghost_norm_fwd
        ghost_norm_fwd(a, gs, outs, empty=_alloc.empty)
    else:
        from dpkern.kernels.instantiate_norm import instantiate_norm_fwd
        for g, out in zip(gs, outs):
            instantiate_norm_fwd(a, g, out, empty=_alloc.empty)
    return outs


def linear_norm_sq(a: torch.Tensor, g: torch.Tensor, *, method: str = "auto",
                   backend: str | None = None) -> torch.Tensor:
    """Per-sample ‖g_iᵀ a_i‖²_F of a Linear layer's weight gradient, in fp32.

    Args:
        a: (B, T, d) layer input; float32 / float16 / bfloat16; any strides. B, T may be 0.
        g: (B, T, p) gradient of the layer output, same device.
        method: "auto" | "ghost" | "instantiate" (see module docstring).
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").
    Returns:
        (B,) float32.

    Example:
        >>> a, g = torch.ones(1, 2, 3), torch.ones(1, 2, 4)
        >>> linear_norm_sq(a, g)   # G = 2 * ones(4, 3)
        tensor([48.])
    """
    return linear_norm_sq_shared(a, [g], method=method, backend=backend)[0]


def bias_norm_sq(g: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Per-sample ‖Σ_t g_it‖² (a bias's gradient; also a LayerNorm/RMSNorm weight's with g replaced
    by g ⊙ x̂). g: (B, T, p) float -> (B,) float32. A bandwidth-bound reduction: every backend
    runs it as one fp32 torch reduction (the backend name is still validated)."""
    op = "bias_norm_sq"
    check_tensor(op, "g", g, 3)
    resolve_backend(backend, g.device, op=op)  # validates the name; every backend reduces with torch
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    return g.sum(dim=1, dtype=acc).square().sum(dim=1)
