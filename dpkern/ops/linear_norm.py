"""Per-sample squared Frobenius norm of a Linear layer's weight gradient, never forming it in HBM.

For y = a Wᵀ (a: (B, T, d), y and its grad g: (B, T, p)) sample i's weight gradient is G_i = g_iᵀ a_i
(p × d). Two exact ways to get ‖G_i‖²_F (kernels/README_persample.md has the derivation):

* "ghost":        ⟨a_i a_iᵀ, g_i g_iᵀ⟩_F — two T × T Grams; ~2T²(d+p) FLOPs (half with symmetry).
* "instantiate":  form G_i tile by tile on chip, square and sum; ~2Tdp FLOPs.
* "auto":         whichever the FLOP model says is cheaper for this (T, d, p) and backend.

All backends compute in fp32 (or wider for float64 input), whatever the input dtype. fp32 inputs
follow the mode of `_persample.fp32_mode` ("tf32r" on GPU: operands rounded to TF32, as the
book-keeping kernel rounds them). The fp32 accumulation error that remains is bounded by
`norm_error_bound` / `bookkeeping_error_bound`; `norm_rounding_margin` turns the two into the factor
the engine folds into the clip: c_i = min(1, C / (‖G_i‖ (1 + margin))).
"""
from __future__ import annotations

import functools
import math

import torch

from dpkern import _alloc
from dpkern.backend import resolve_backend
from dpkern.ops import _persample
from dpkern.ops._persample import (PlanCache, call_resolver, check_shared_input, check_tensor,
                                   exact_fp32_matmul, fp32_mode, groupable, layout_key, operand,
                                   plan_key, sample_chunks, shared_items_sig)

METHODS = ("auto", "ghost", "instantiate")
_IMPLEMENTED = ("triton", "torch")
_fp32_mode = fp32_mode  # the parameter of the same name shadows it inside the ops


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
    check_shared_input(op, a, gs)
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")


def _torch_norms(a: torch.Tensor, gs: list, method: str, mode: str) -> list:
    """Torch backend: batched matmuls in exact fp32 on the operands as the kernels see them (TF32-
    rounded in "tf32r"), final sums in fp64, chunked over samples to bound memory."""
    bsz, seq, d = a.shape
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    outs = [torch.empty(bsz, dtype=acc, device=a.device) for _ in gs]
    if method == "ghost":
        per_sample = 8 * seq * seq + 4 * seq * (d + max(g.shape[2] for g in gs))
    else:
        per_sample = 4 * max(g.shape[2] for g in gs) * (d + seq) + 4 * seq * d
    with exact_fp32_matmul(a.device):
        for sl in sample_chunks(bsz, per_sample):
            a_c = operand(a[sl], mode, acc)
            gram_a = a_c @ a_c.transpose(1, 2) if method == "ghost" else None
            for out, g in zip(outs, gs):
                g_c = operand(g[sl], mode, acc)
                if method == "ghost":
                    prod = gram_a * (g_c @ g_c.transpose(1, 2))
                else:
                    prod = (g_c.transpose(1, 2) @ a_c).square()
                out[sl] = prod.sum(dim=(1, 2), dtype=torch.float64)
    return outs


def linear_norm_sq_shared(a: torch.Tensor, gs: list, *, method: str = "auto",
                          backend: str | None = None, fp32_mode: str | None = None) -> list:
    """Per-sample ‖g_kᵀ a‖²_F for several layers that read the same input (q/k/v, gate/up).

    Args:
        a: (B, T, d) the shared input; float32 / float16 / bfloat16.
        gs: list of (B, T, p_k) output gradients, any float dtypes, on a's device.
        method: "auto" | "ghost" | "instantiate" (one choice for the group; ghost computes a's
            Gram once for all of them).
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").
        fp32_mode: "tf32r" | "ieee" | "tf32x3" for fp32 inputs (default: env knobs, else "tf32r" on
            CUDA, "ieee" on CPU); book-keeping must run in the same mode.
    Returns:
        list of (B,) float32 tensors, one per entry of gs.

    Example:
        >>> a = torch.randn(2, 5, 8); q, k = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
        >>> [n.shape for n in linear_norm_sq_shared(a, [q, k])]
        [torch.Size([2]), torch.Size([2])]
    """
    op = "linear_norm_sq_shared"
    _check(op, a, gs, method)
    gs = list(gs)
    mode = _fp32_mode(a.device, fp32_mode)
    be = resolve_backend(backend, a.device, op=op, implemented=_IMPLEMENTED,
                         auto_order=("triton",))
    bsz, seq, d = a.shape
    if method == "auto":
        method = choose_method(seq, d, [g.shape[2] for g in gs], be)
    if be == "torch" or bsz == 0 or seq == 0:
        if bsz == 0 or seq == 0:
            return [torch.zeros(bsz, dtype=torch.float32, device=a.device) for _ in gs]
        return _torch_norms(a, gs, method, mode)
    if method == "ghost":
        from dpkern.kernels.ghost_norm import ghost_norm_fwd
        out = _alloc.empty(len(gs), bsz, dtype=torch.float32, device=a.device)
        ghost_norm_fwd(a, gs, out, empty=_alloc.empty, fp32_mode=mode)
        return list(out.unbind(0))
    from dpkern.kernels.instantiate_norm import instantiate_norm_fwd
    outs = [_alloc.empty(bsz, dtype=torch.float32, device=a.device) for _ in gs]
    for g, out in zip(gs, outs):
        instantiate_norm_fwd(a, g, out, empty=_alloc.empty, fp32_mode=mode)
    return outs


def linear_norm_sq_grouped(items: list, *, backend: str | None = None,
                           fp32_mode: str | None = None) -> list:
    """linear_norm_sq_shared for many layers at once: items [(a, gs), ...] -> [[(B,) fp32, ...]].

    Layers whose inputs have one layout (shape, strides, dtype) and whose gradients have one
    layout per position, all in a's dtype, with the ghost method chosen for them, at most
    _persample.GROUP_MAX_TOKENS rows and 16-byte aligned tensors, share one Triton launch (per
    three gradients): the 16 q/k/v groups of a 16-layer model are one launch, not 16.
    The numbers are those of linear_norm_sq_shared on each item (same kernel, same tiles); other
    items, and the torch backend, run item by item.

    Example:
        >>> a = torch.randn(2, 5, 8); g = torch.randn(2, 5, 4)
        >>> [[n.shape for n in ns] for ns in linear_norm_sq_grouped([(a, [g]), (a, [g, g])])]
        [[torch.Size([2])], [torch.Size([2]), torch.Size([2])]]
    """
    op = "linear_norm_sq_grouped"
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{op}: items must be a list of (a, gs) pairs")
    resolve = call_resolver(op, backend, fp32_mode, _IMPLEMENTED)
    sig, devices = shared_items_sig(items)
    units = _PLANS.get(plan_key(sig, resolve, devices, _persample.GROUP_MAX_TOKENS),
                       lambda: _plan(op, items, resolve))
    out: list = [None] * len(items)
    for mode, idx in units:
        if mode is None:  # run alone
            a, gs = items[idx[0]]
            out[idx[0]] = linear_norm_sq_shared(a, list(gs), backend=backend, fp32_mode=fp32_mode)
            continue
        a0, gs0 = items[idx[0]]
        if len(idx) == 1:
            out[idx[0]] = linear_norm_sq_shared(a0, list(gs0), method="ghost", backend="triton",
                                                fp32_mode=mode)
            continue
        from dpkern.kernels.ghost_norm import ghost_norm_grouped_fwd
        res = _alloc.empty(len(idx), len(gs0), a0.shape[0], dtype=torch.float32, device=a0.device)
        ghost_norm_grouped_fwd([items[i][0] for i in idx], [list(items[i][1]) for i in idx], res,
                               empty=_alloc.empty, fp32_mode=mode)
        flat, k = res.view(-1, a0.shape[0]).unbind(0), len(gs0)  # one unbind for the launch
        for j, i in enumerate(idx):
            out[i] = list(flat[j * k:(j + 1) * k])
    return out


_PLANS = PlanCache()


def _plan(op: str, items: list, resolve) -> list:
    """linear_norm_sq_grouped's plan, after checking every item: [(mode, item indices)], one
    grouped ghost launch per entry; mode None: the item runs alone."""
    for a, gs in items:
        check_shared_input(op, a, gs)
    units, buckets = [], {}
    for i, (a, gs) in enumerate(items):
        be, mode = resolve(a.device)
        bsz, seq, d = a.shape
        if (be == "triton" and bsz * seq > 0 and all(g.dtype == a.dtype for g in gs)
                and groupable(a, *gs)
                and choose_method(seq, d, [g.shape[2] for g in gs], be) == "ghost"):
            key = (layout_key(a), tuple(layout_key(g) for g in gs), mode)
            buckets.setdefault(key, []).append(i)
        else:
            units.append((None, [i]))
    return units + [(key[2], idx) for key, idx in buckets.items()]


def linear_norm_sq(a: torch.Tensor, g: torch.Tensor, *, method: str = "auto",
                   backend: str | None = None, fp32_mode: str | None = None) -> torch.Tensor:
    """Per-sample ‖g_iᵀ a_i‖²_F of a Linear layer's weight gradient, in fp32.

    Args:
        a: (B, T, d) layer input; float32 / float16 / bfloat16; any strides. B, T may be 0.
        g: (B, T, p) gradient of the layer output, same device.
        method: "auto" | "ghost" | "instantiate" (see module docstring).
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").
        fp32_mode: see linear_norm_sq_shared.
    Returns:
        (B,) float32.

    Example:
        >>> a, g = torch.ones(1, 2, 3), torch.ones(1, 2, 4)
        >>> linear_norm_sq(a, g)   # G = 2 * ones(4, 3)
        tensor([48.])
    """
    return linear_norm_sq_shared(a, [g], method=method, backend=backend, fp32_mode=fp32_mode)[0]


def bias_norm_sq(g: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Per-sample ‖Σ_t g_it‖² (a bias's gradient; also a LayerNorm/RMSNorm weight's with g replaced
    by g ⊙ x̂). g: (B, T, p) float -> (B,) float32. A bandwidth-bound reduction: every backend
    runs it as one fp32 torch reduction (the backend name is still validated)."""
    op = "bias_norm_sq"
    check_tensor(op, "g", g, 3)
    resolve_backend(backend, g.device, op=op)  # validates the name; every backend reduces with torch
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    return g.sum(dim=1, dtype=acc).square().sum(dim=1)


# ---- fp32 accumulation error of the norms and the book-keeping (kernels/README_persample.md) -----
# One full fp32 ulp per operation (u = 2^-23, not the 2^-24 of round-to-nearest) also covers the
# truncating adds of tensor-core accumulators. γ(n) = n u / (1 - n u) bounds n chained operations in
# any order. Tile sizes: the largest of every config and search space (ghost BLOCK_T ≤ 128,
# instantiation BLOCK_P, BLOCK_D ≤ 256); partials are summed in fp64 (one rounding).
FP32_ULP = 2.0 ** -23
MAX_GHOST_BLOCK_T = 128
MAX_OUT_BLOCK = 256


def _gamma(n: float) -> float:
    nu = n * FP32_ULP
    return nu / (1.0 - nu) if nu < 1.0 else math.inf


def _chain(k: int, mode: str) -> int:
    """Rounded operations behind one length-k fp32 dot product in `mode` (tf32r and 16-bit inputs:
    exact products; ieee: one rounding per product; tf32x3: three accumulated products each plus
    the split's rounding, counted as 3k + 8)."""
    if mode == "tf32r":
        return k
    if mode == "ieee":
        return k + 1
    if mode == "tf32x3":
        return 3 * k + 8
    raise ValueError(f"mode must be 'tf32r', 'ieee' or 'tf32x3', got {mode!r}")


@functools.lru_cache(maxsize=4096)  # the engine asks for every parameter's bound every backward
def norm_error_bound(seq: int, d: int, p: int, method: str = "auto", mode: str = "tf32r") -> float:
    """η with |N̂_i² − ‖G̃_i‖²| ≤ η · ‖|g̃_i|ᵀ|ã_i|‖²_F for the squared norm N̂_i² that linear_norm_sq
    returns (any backend), where G̃_i = g̃_iᵀ ã_i is formed exactly from the operands as the kernels
    see them (ã = round_tf32(a) in "tf32r"). "auto": the larger of the two methods.

    ghost:        Gram entries are length-d and length-p dots, one product, a tile sum of
                  ≤ 2·BLOCK_T terms in chain:            η = γ(chain(d) + chain(p) + 2·BLOCK_T + 2)
    instantiate:  G̃ entries are length-T dots, squared (|Ĝ² − G̃²| ≤ (2γ_T + γ_T²)·|G|_abs²), a
                  tile sum of ≤ BLOCK_P + BLOCK_D:       η = γ(2·chain(T) + BLOCK_P + BLOCK_D + 2)
    """
    ghost = _gamma(_chain(d, mode) + _chain(p, mode) + 2 * MAX_GHOST_BLOCK_T + 2)
    inst = _gamma(2 * _chain(seq, mode) + 2 * MAX_OUT_BLOCK + 2)
    if method == "ghost":
        return ghost
    if method == "instantiate":
        return inst
    if method == "auto":
        return max(ghost, inst)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@functools.lru_cache(maxsize=4096)
def bookkeeping_error_bound(seq: int, mode: str = "tf32r") -> float:
    """β with ‖fl(c_i Ĝ_i) − c_i G̃_i‖_F ≤ β · c_i ‖|g̃_i|ᵀ|ã_i|‖_F for the per-sample fp32 partial
    Ĝ_i of the book-keeping kernel (length-T dots, then one multiply by c_i): β = γ(chain(T) + 1).
    The Triton kernel fuses that multiply into the add of the running sum over samples (one
    fused multiply-add): the product then is not rounded on its own, one rounding fewer than β
    counts."""
    return _gamma(_chain(seq, mode) + 1)


def norm_rounding_margin(seq: int, d: int, p: int, *, method: str = "auto", mode: str = "tf32r",
                         n_norms: int = 1, cond: float = 1.0) -> float:
    """Relative margin m such that clipping with c_i = min(1, C / (N̂_i (1 + m))) keeps the released
    contribution fl(c_i Ĝ_i) of every sample at norm ≤ C, in exact arithmetic on the fp32 values.

    Args:
        seq, d, p: the layer's T and widths (take the largest over the model's layers: the margin
            grows with each).
        n_norms: how many per-layer squared norms the engine adds in fp32 into one ‖G_i‖²
            (flat clipping: the number of private parameters).
        cond: κ_i = ‖|g̃_i|ᵀ|ã_i|‖_F / ‖g̃_iᵀ ã_i‖_F ≥ 1, the conditioning of the per-sample sum.
            κ = 1 without cancellation across tokens (e.g. same-sign inputs). Under cancellation the
            required margin grows as κ² and no margin computed from the norm alone can cover it (the
            same holds for exact fp32): use norm_upper_bound with a bound on ‖|g̃|ᵀ|ã|‖ instead.
        Also covers the engine's own fp32 ops on the norm (sqrt, the (1 + m) and C / x: 8 ulps).
    Returns:
        m ≥ 0 (inf when the bound is vacuous, η κ² ≥ 1).

    Derivation: ‖G̃‖² ≤ N̂² + η κ² ‖G̃‖² and ‖fl(c Ĝ)‖ ≤ c ‖G̃‖ (1 + β κ), so
    1 + m = (1 + β κ)(1 + 8u) / sqrt(1 − η κ² − γ(n_norms)).
    """
    if cond < 1.0:
        raise ValueError(f"norm_rounding_margin: cond must be ≥ 1, got {cond}")
    eta = norm_error_bound(seq, d, p, method, mode) * cond * cond + _gamma(n_norms)
    if eta >= 1.0:
        return math.inf
    beta = bookkeeping_error_bound(seq, mode)
    return (1.0 + beta * cond) * (1.0 + 8 * FP32_ULP) / math.sqrt(1.0 - eta) - 1.0


# A margin that holds for every layer with T ≤ 16384 and d, p ≤ 16384, any method and mode but
# tf32x3, flat clipping over ≤ 4096 parameters, κ = 1: ≈ 4.2e-3, i.e. clip at C / 1.0042.
CLIP_SAFETY_MARGIN = norm_rounding_margin(16384, 16384, 16384, mode="ieee", n_norms=4096)


def norm_upper_bound(norm_sq: torch.Tensor, abs_sq: torch.Tensor, seq: int, d: int, p: int, *,
                     method: str = "auto", mode: str = "tf32r") -> torch.Tensor:
    """A worst-case bound U_i ≥ ‖fl(Ĝ_i)‖ valid under cancellation too: clip with c_i = min(1, C / U_i).

    Args:
        norm_sq: (B,) N̂_i² from linear_norm_sq. abs_sq: (B,) Q_i ≥ ‖|g̃_i|ᵀ|ã_i|‖²_F, e.g.
            abs_norm_bound_sq(a, g) (a cheap O(BT(d+p)) bound) or linear_norm_sq(|a|, |g|).
    Returns:
        (B,) float64: sqrt(N̂² + η Q) + β sqrt(Q), inflated by 8 ulps for the fp32 inputs.
    """
    eta = norm_error_bound(seq, d, p, method, mode)
    beta = bookkeeping_error_bound(seq, mode)
    n2, q = norm_sq.double().clamp_min(0), abs_sq.double()
    return ((n2 + eta * q).sqrt() + beta * q.sqrt()) * (1.0 + 8 * FP32_ULP)


def abs_norm_bound_sq(a: torch.Tensor, g: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """(B,) float64 Q_i = (Σ_t ‖ã_it‖ ‖g̃_it‖)² ≥ ‖|g̃_i|ᵀ|ã_i|‖²_F (triangle inequality over the
    rank-one terms): one memory-bound pass over a (B, T, d) and g (B, T, p), in fp64."""
    mode = _fp32_mode(a.device, mode)
    na = operand(a, mode, torch.float64).norm(dim=2)
    ng = operand(g, mode, torch.float64).norm(dim=2)
    return (na * ng).sum(dim=1).square()
