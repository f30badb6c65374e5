"""Upper bounds on each sample's released contribution, covering the fp32 error of the norms and of
the book-keeping (kernels/README_persample.md, "Remaining error"; engine_README.md, "Clip bound").

For one parameter with uses u (Linear, Embedding, per-sample), sample i, the engine releases
fl(c_i Ĝ_i) where Ĝ_i is the book-keeping's fp32 partial of G̃_i (the exact gradient of the
operands as the kernels see them). With N̂_i² the fp32 squared norm the ops return and
Q_i ≥ ‖|g̃_i|ᵀ|ã_i|‖²_F (the no-cancellation norm), `dpkern.ops.linear_norm` proves

    ‖G̃_i‖ ≤ sqrt(N̂_i² + η Q_i)   and   ‖fl(c Ĝ_i) − c G̃_i‖ ≤ β c sqrt(Q_i),

so U_i = (sqrt(N̂_i² + η Q_i) + β sqrt(Q_i)) (1 + 8u) bounds the released contribution for any
inputs, cancelling ones included (no margin computed from N̂ alone can: the error of N̂² is relative
to Q, not to N̂²). Q comes from one memory-bound pass, sqrt(Q_i) ≤ Σ_t ‖a_it‖ ‖g_it‖ (triangle
inequality over the rank-one terms), computed in fp32 and inflated for its own rounding and for
TF32 rounding of the operands. Several uses of one parameter (tied embedding / lm_head, a layer
called twice) add their sqrt(Q) (the cross term's error is bounded by the same product).
"""
from __future__ import annotations

import functools
import math

import torch

from dpkern import _alloc
from dpkern.layers.uses import EmbeddingUse, LinearUse, PerSampleRows, PerSampleUse, input_key
from dpkern.ops._persample import fp32_mode
from dpkern.ops.rownorm import row_norm_dots_grouped
from dpkern.ops.linear_norm import FP32_ULP, bookkeeping_error_bound, norm_error_bound

# |round_tf32(x)| ≤ |x| (1 + 2^-11): the operands the kernels multiply may be that much larger.
_TF32_GROWTH = (1.0 + 2.0 ** -11) ** 2


def _gamma(n: float) -> float:
    nu = n * FP32_ULP
    return nu / (1.0 - nu) if nu < 1.0 else math.inf


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """(B, T, n) -> (B, T) fp32 Euclidean norms of the rows, accumulated in fp32 straight from the
    input dtype (no fp32 copy of x)."""
    return torch.linalg.vector_norm(x, dim=2, dtype=torch.float32)


def _sqrt_q(use, linear_sums: dict, row_norms: dict | None = None
            ) -> tuple[torch.Tensor, float, tuple[int, int, int]]:
    """(s, f, (T, d, p)): s (B,) fp64 with f·s a bound on sqrt(Q_i) for one use (f a float the
    caller applies, so that one multiply serves every parameter), and (T, d, p) for η and β.
    row_norms: {id(use): s} of PerSampleUses whose norms were taken per width (PerSampleRows)."""
    if isinstance(use, PerSampleUse):
        flat = use.grads.reshape(use.grads.shape[0], -1)
        s = row_norms.get(id(use)) if row_norms else None
        if s is None:
            s = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)
        return s, 1.0, (1, flat.shape[1], 1)
    if isinstance(use, EmbeddingUse):
        bsz, seq, d = use.g.shape
        rows = _row_norms(use.g)
        if use.padding_idx is not None:
            rows = torch.where(use.ids.reshape(bsz, seq) == use.padding_idx, 0.0, rows)
        return rows.sum(dim=1, dtype=torch.float64), 1.0 + _gamma(d + seq + 4), (seq, d, 1)
    bsz, seq, d = use.a.shape
    p = use.g.shape[2]
    s = linear_sums[id(use)]  # fp32 row norms and products, fp64 sum (row_norm_dots)
    return s, (1.0 + _gamma(d + p + 6)) * _TF32_GROWTH, (seq, d, p)


def _linear_sums(uses_by_param: dict, params: list, backend) -> dict:
    """{id(LinearUse): (B,) fp64 Σ_t ‖a_t‖‖g_t‖}: one row_norm_dots per shared input, layers of
    one layout in one launch (row_norm_dots_grouped)."""
    groups: dict = {}
    for p in params:
        for u in uses_by_param[p]:
            if isinstance(u, LinearUse):
                groups.setdefault(input_key(u.a), []).append(u)
    groups = list(groups.values())
    res = row_norm_dots_grouped([(us[0].a, [u.g for u in us]) for us in groups], backend=backend)
    out = {}
    for us, r in zip(groups, res):
        out.update(zip(map(id, us), r.unbind(0)))
    return out


@functools.lru_cache(maxsize=4096)  # a handful of distinct shapes, asked for every backward
def _error_terms(seq: int, d: int, w: int, mode: str) -> tuple[float, float]:
    """(η, β) of a parameter whose uses add up to T = seq, widths d and w, in fp32 mode `mode`.
    Embedding norms and index_add book-keeping use IEEE fp32 dots even under "tf32r"."""
    return (max(norm_error_bound(seq, d, w, "auto", mode),
                norm_error_bound(seq, d, w, "auto", "ieee")),
            max(bookkeeping_error_bound(seq, mode), bookkeeping_error_bound(seq, "ieee")))


def _device_constants(values: list, device) -> torch.Tensor:
    """(len(values),) float64 on device, without a host-GPU synchronisation (once per backward:
    a blocking upload here made the host wait for the GPU's whole queue)."""
    return _alloc.device_constants(values, device, torch.float64)


def release_bounds(uses_by_param: dict, params: list, norms_sq: list, *,
                   backend: str | None = None, rows: PerSampleRows | None = None) -> list:
    """U_k (B,) float64 for each of `params`: an upper bound on the norm of every sample's released
    contribution to that parameter, before loss scaling (see the module docstring).

    Args:
        uses_by_param: {param: [uses]} of one backward pass.
        params: the parameters, in the order of norms_sq.
        norms_sq: (B,) fp32 N̂² per parameter, as norms_sq() returned them.
        rows: the stacked rows of the one-per-sample-use parameters, when the caller has them:
            their sqrt(Q) terms are then taken per width, not per parameter (same values).
    """
    if not params:
        return []
    linear_sums = _linear_sums(uses_by_param, params, backend)
    sqs, facs, etas, betas = [], [], [], []
    mode = fp32_mode(norms_sq[0].device)
    row_norms = None
    if rows is not None:  # one PerSampleUse each: their norms per width
        row_norms = {id(uses_by_param[p][0]): s for p, s in rows.norms64().items()}
    for p, n2 in zip(params, norms_sq):
        parts, seq, d, w = [], 0, 1, 1
        for u in uses_by_param[p]:
            s, f, (t_u, d_u, p_u) = _sqrt_q(u, linear_sums, row_norms)
            parts.append((s, f))
            seq, d, w = seq + t_u, max(d, d_u), max(w, p_u)
        if len(parts) == 1:
            sqs.append(parts[0][0])
            facs.append(parts[0][1])
        else:  # several uses: their bounds add (rare: tied weights, a layer called twice)
            sqs.append(sum(s * f for s, f in parts))
            facs.append(1.0)
        eta, beta = _error_terms(seq, d, w, mode)
        etas.append(eta)
        betas.append(beta)
    # One batched evaluation over all parameters (P, B): a handful of launches, not ~10 per layer.
    dev = norms_sq[0].device
    n2 = torch.stack(norms_sq).double().clamp_min(0)
    sq = torch.stack(sqs) * _device_constants(facs, dev).unsqueeze(1)
    eta = _device_constants(etas, dev).unsqueeze(1)
    beta = _device_constants(betas, dev).unsqueeze(1)
    bound = ((n2 + eta * sq.square()).sqrt() + beta * sq) * (1.0 + 8 * FP32_ULP)
    return list(torch.where(torch.isfinite(n2), bound, math.inf).unbind(0))
