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
from dpkern.layers.uses import (EmbeddingUse, LinearInputs, LinearUse, PerSampleRows,
                               PerSampleUse)
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


def _sqrt_q(use) -> tuple[torch.Tensor, float, tuple[int, int, int]]:
    """(s, f, (T, d, p)): s (B,) fp64 with f·s a bound on sqrt(Q_i) for one use that is not a
    LinearUse (f a float the caller applies, so that one multiply serves every parameter), and
    (T, d, p) for η and β. A LinearUse's s is its row of _linear_sums, and a PerSampleUse held in
    PerSampleRows has its row of norms64 (f and shape: _use_terms)."""
    if isinstance(use, PerSampleUse):
        flat = use.grads.reshape(use.grads.shape[0], -1)
        return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64), *_use_terms(use)
    if isinstance(use, EmbeddingUse):
        bsz, seq, d = use.g.shape
        rows = _row_norms(use.g)
        if use.padding_idx is not None:
            rows = torch.where(use.ids.reshape(bsz, seq) == use.padding_idx, 0.0, rows)
        return rows.sum(dim=1, dtype=torch.float64), 1.0 + _gamma(d + seq + 4), (seq, d, 1)
    raise TypeError(f"_sqrt_q: a {type(use).__name__} has no computed term (_use_terms)")


def _use_terms(use) -> tuple[float, tuple[int, int, int]]:
    """(f, (T, d, p)) of a use whose s is gathered (a LinearUse's row of _linear_sums, a
    PerSampleUse's row of its width): the factor and the shape _sqrt_q gives for it."""
    if isinstance(use, LinearUse):
        bsz, seq, d = use.a.shape
        p = use.g.shape[2]
        return (1.0 + _gamma(d + p + 6)) * _TF32_GROWTH, (seq, d, p)
    return 1.0, (1, use.grads.reshape(use.grads.shape[0], -1).shape[1], 1)


def _linear_sums(linear: LinearInputs, backend) -> tuple:
    """(sums, row): sums (N, B) fp64 with row[id(LinearUse)] its Σ_t ‖a_t‖‖g_t‖, for every
    LinearUse of `linear` (None when there is none). One row_norm_dots per shared input, layers
    of one layout in one launch (row_norm_dots_grouped); their results in one tensor, not one
    per use (host time: a 1B Llama has 113)."""
    if not linear.groups:
        return None, {}
    res = row_norm_dots_grouped(linear.items, backend=backend)
    row, n = {}, 0
    for group in linear.groups:
        for _, u in group:
            row[id(u)] = n
            n += 1
    return (torch.cat(res) if len(res) > 1 else res[0]), row


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


def release_bounds(uses_by_param: dict, params: list, norms_sq, *,
                   backend: str | None = None, rows: PerSampleRows | None = None,
                   linear: LinearInputs | None = None) -> list:
    """U_k (B,) float64 for each of `params`: the rows of release_bound_matrix."""
    if not params:
        return []
    return list(release_bound_matrix(uses_by_param, params, norms_sq, backend=backend,
                                     rows=rows, linear=linear).unbind(0))


def release_bound_matrix(uses_by_param: dict, params: list, norms_sq, *,
                         backend: str | None = None, rows: PerSampleRows | None = None,
                         linear: LinearInputs | None = None) -> torch.Tensor:
    """(P, B) float64: row k an upper bound U_k on the norm of every sample's released
    contribution to params[k], before loss scaling (see the module docstring).

    Args:
        uses_by_param: {param: [uses]} of one backward pass.
        params: the parameters, in the order of norms_sq (P ≥ 1).
        norms_sq: (B,) fp32 N̂² per parameter, as norms_sq() returned them, or their (P, B) stack.
        rows: the stacked rows of the one-per-sample-use parameters, when the caller has them:
            their sqrt(Q) terms are then taken per width, not per parameter (same values).
        linear: the LinearInputs of (uses_by_param, params), when the caller has them.
    The sqrt(Q) terms are gathered from a few (n, B) tensors (the Linear sums of all layers, the
    rows' norms per width) by one index_select, not stacked from one tensor per parameter.
    """
    if linear is None:
        linear = LinearInputs(uses_by_param, params)
    sums, linear_row = _linear_sums(linear, backend)
    dev = norms_sq[0].device
    pieces, n_rows = ([sums], sums.shape[0]) if sums is not None else ([], 0)
    rows_row = {}  # id(PerSampleUse) -> its row among the pieces
    if rows is not None:  # one PerSampleUse each: their norms per width
        for ps, norms in rows.norms64():
            pieces.append(norms)
            for p in ps:
                rows_row[id(uses_by_param[p][0])] = n_rows
                n_rows += 1
    index, facs, etas, betas = [], [], [], []
    mode = fp32_mode(dev)
    for p in params:
        us = uses_by_param[p]
        if len(us) == 1:
            u = us[0]
            r = linear_row.get(id(u)) if isinstance(u, LinearUse) else rows_row.get(id(u))
            if r is None:
                s, f, (seq, d, w) = _sqrt_q(u)
                pieces.append(s.view(1, -1))
                r, n_rows = n_rows, n_rows + 1
            else:
                f, (seq, d, w) = _use_terms(u)
            index.append(r)
            facs.append(f)
        else:  # several uses: their bounds add (rare: tied weights, a layer called twice)
            total, seq, d, w = 0.0, 0, 1, 1
            for u in us:
                r = linear_row.get(id(u)) if isinstance(u, LinearUse) else None
                if r is None:
                    s, f, (t_u, d_u, p_u) = _sqrt_q(u)
                else:
                    s, (f, (t_u, d_u, p_u)) = sums[r], _use_terms(u)
                total = total + s * f
                seq, d, w = seq + t_u, max(d, d_u), max(w, p_u)
            pieces.append(total.view(1, -1))
            index.append(n_rows)
            n_rows += 1
            facs.append(1.0)
        eta, beta = _error_terms(seq, d, w, mode)
        etas.append(eta)
        betas.append(beta)
    # One batched evaluation over all parameters (P, B): a handful of launches, not ~10 per layer.
    n2 = norms_sq if isinstance(norms_sq, torch.Tensor) else torch.stack(norms_sq)
    n2 = n2.double().clamp_min(0)
    sq = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    if index != list(range(sq.shape[0])):
        sq = sq.index_select(0, _alloc.device_constants(index, dev, torch.int64))
    sq = sq * _device_constants(facs, dev).unsqueeze(1)
    eta = _device_constants(etas, dev).unsqueeze(1)
    beta = _device_constants(betas, dev).unsqueeze(1)
    bound = ((n2 + eta * sq.square()).sqrt() + beta * sq) * (1.0 + 8 * FP32_ULP)
    return torch.where(torch.isfinite(n2), bound, math.inf)
