"""Shifted CholeskyQR of a stack of tall-skinny blocks, one program per block, float64 inside.

y (B, R, L) = q r with q orthonormal: the Gram yᵀy accumulated in float64 (the products of fp32
values are exact there), shifted by s = coef · trace (Fukaya et al. 2020) so that it is positive
definite for any finite y, factored by Cholesky in registers, inverted in registers, and applied
as q = y r⁻¹ with float64 dots, q rounded to y's dtype. With PASSES = 2 the block is refactored
from its rounded first q (CholeskyQR2) and r = r2 r1. The whole factorisation is one launch for
all blocks: torch needs a cast, two GEMMs, a Cholesky, a triangular inverse and a cast per pass.

This is dpkern.denoise.rsvd._cholqr's function (its torch form is the reference), computed in
another summation order. Per block: `coef_ptr` its shift coefficient, `rows_ptr` its real rows
(the rest of q is written 0 and y is not read there), `cols_ptr` its real columns (only they
enter the trace); without the last two, all R rows and all L columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_L = 64          # registers hold three (L, L) float64 tiles per program


@dataclass(frozen=True)
class CholqrConfig:
    BLOCK_R: int
    BLOCK_L: int
    num_warps: int


def cholqr_config(n_cols: int) -> CholqrConfig:
    """Row tiles of 64 (32 at L = 64), L padded to a power of two >= 16."""
    block_l = max(16, triton.next_power_of_2(n_cols))
    return CholqrConfig(64 if block_l <= 32 else 32, block_l, 4 if block_l <= 32 else 8)


@triton.jit
def _cholesky_inverse(a, o_l, BLOCK_L: tl.constexpr):
    """a [BL, BL] symmetric positive definite -> (c, x): a = c cᵀ, c lower, x = c⁻¹."""
    c = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float64)
    x = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float64)
    rows = o_l[:, None]
    cols = o_l[None, :]
    for j in range(BLOCK_L):
        # right-looking: column j of c from the trailing matrix, then its rank-1 update
        a_col = tl.sum(tl.where(cols == j, a, 0.0), 1)                       # a[:, j]
        d = tl.sqrt(tl.sum(tl.where(o_l == j, a_col, 0.0), 0))
        col = tl.where(o_l > j, a_col / d, tl.where(o_l == j, d, 0.0))       # [BL]
        c += tl.where(cols == j, col[:, None], 0.0)
        a -= col[:, None] * col[None, :]
    for j in range(BLOCK_L):
        # forward substitution, a row of x at a time: x[j] = (e_j - c[j, :j] x[:j]) / c[j, j]
        c_row = tl.sum(tl.where(rows == j, c, 0.0), 0)                       # c[j, :]
        d = tl.sum(tl.where(o_l == j, c_row, 0.0), 0)
        acc = tl.sum(tl.where(rows < j, c_row[:, None] * x, 0.0), 0)         # Σ_k<j c[j,k] x[k,:]
        x_row = (tl.where(o_l == j, 1.0, 0.0) - acc) / d
        x += tl.where(rows == j, x_row[None, :], 0.0)
    return c, x


@triton.jit
def _shifted(g, o_l, n_real, coef, n_cols):
    """g + (coef · trace over the real columns + 1e-300) I on the block's columns, and 1 on the
    diagonal past them (tile padding: keeps the factorisation finite, never stored)."""
    diag = o_l[:, None] == o_l[None, :]
    trace = tl.sum(tl.sum(tl.where(diag & (o_l[None, :] < n_real), g, 0.0), 1), 0)
    shift = trace * coef + 1e-300
    g = tl.where(diag & (o_l[None, :] < n_cols), g + shift, g)
    return tl.where(diag & (o_l[None, :] >= n_cols), 1.0, g)


@triton.jit
def _cholqr_fwd_kernel(y_ptr, q_ptr, r_ptr, rows_ptr, cols_ptr, coef_ptr, n_rows, n_cols,
                       stride_yb, stride_yr, stride_yl, stride_qb, stride_qr, stride_ql,
                       PASSES: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_COLS: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    y_ptr += i_b * stride_yb
    q_ptr += i_b * stride_qb
    r_ptr += i_b * n_cols * n_cols
    rows = n_rows
    if HAS_ROWS:
        rows = tl.load(rows_ptr + i_b)
    n_real = n_cols
    if HAS_COLS:
        n_real = tl.load(cols_ptr + i_b)
    coef = tl.load(coef_ptr + i_b)                                  # float64
    o_l = tl.arange(0, BLOCK_L)
    o_r = tl.arange(0, BLOCK_R)
    m_l = o_l < n_cols
    # pass 1: the Gram of y, in float64
    g = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float64)
    for r0 in range(0, rows, BLOCK_R):
        o_rr = (r0 + o_r).to(tl.int64)
        b_y = tl.load(y_ptr + o_rr[:, None] * stride_yr + o_l[None, :] * stride_yl,
                      mask=(o_rr[:, None] < rows) & m_l[None, :], other=0.0).to(tl.float64)
        g += tl.dot(tl.trans(b_y), b_y)                                      # [BL, BL]
    c1, x1 = _cholesky_inverse(_shifted(g, o_l, n_real, coef, n_cols), o_l, BLOCK_L)
    c = c1
    x2 = x1
    if PASSES == 2:
        # pass 2: the Gram of the rounded first q = y c1⁻ᵀ, recomputed tile by tile
        g = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float64)
        for r0 in range(0, rows, BLOCK_R):
            o_rr = (r0 + o_r).to(tl.int64)
            b_y = tl.load(y_ptr + o_rr[:, None] * stride_yr + o_l[None, :] * stride_yl,
                          mask=(o_rr[:, None] < rows) & m_l[None, :], other=0.0).to(tl.float64)
            b_q = tl.dot(b_y, tl.trans(x1)).to(q_ptr.dtype.element_ty).to(tl.float64)
            g += tl.dot(tl.trans(b_q), b_q)
        c2, x2 = _cholesky_inverse(_shifted(g, o_l, n_real, coef, n_cols), o_l, BLOCK_L)
        c = tl.dot(c1, c2)                                  # r = r2 r1 = (c1 c2)ᵀ
    # r (upper) = cᵀ, the block's first n_cols x n_cols
    m_ll = m_l[:, None] & m_l[None, :]
    tl.store(r_ptr + o_l[:, None] * n_cols + o_l[None, :], tl.trans(c), mask=m_ll)
    # last pass: q = y r⁻¹ (rounded after each factor, as the torch form), 0 past the real rows
    for r0 in range(0, n_rows, BLOCK_R):
        o_rr = (r0 + o_r).to(tl.int64)
        b_y = tl.load(y_ptr + o_rr[:, None] * stride_yr + o_l[None, :] * stride_yl,
                      mask=(o_rr[:, None] < rows) & m_l[None, :], other=0.0).to(tl.float64)
        b_q = tl.dot(b_y, tl.trans(x1)).to(q_ptr.dtype.element_ty)
        if PASSES == 2:
            b_q = tl.dot(b_q.to(tl.float64), tl.trans(x2)).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + o_rr[:, None] * stride_qr + o_l[None, :] * stride_ql, b_q,
                 mask=(o_rr[:, None] < n_rows) & m_l[None, :])


def cholqr_fwd(y: torch.Tensor, q: torch.Tensor, r: torch.Tensor, passes: int,
               coef: torch.Tensor, *, rows: torch.Tensor | None = None,
               cols: torch.Tensor | None = None, config: CholqrConfig | None = None) -> None:
    """y (B, R, L) float32 / float64, 1 <= L <= MAX_L -> q (B, R, L) in y's dtype, r (B, L, L)
    float64 contiguous. coef: (B,) float64 shift coefficients; rows, cols: (B,) int32 real rows /
    columns per block, or None (all). Caller validates; B, R > 0."""
    bsz, n_rows, n_cols = y.shape
    cfg = config or cholqr_config(n_cols)
    _cholqr_fwd_kernel[(bsz,)](
        y_ptr=y, q_ptr=q, r_ptr=r, rows_ptr=rows if rows is not None else coef,
        cols_ptr=cols if cols is not None else coef, coef_ptr=coef, n_rows=n_rows, n_cols=n_cols,
        stride_yb=y.stride(0), stride_yr=y.stride(1), stride_yl=y.stride(2),
        stride_qb=q.stride(0), stride_qr=q.stride(1), stride_ql=q.stride(2),
        PASSES=passes, HAS_ROWS=rows is not None, HAS_COLS=cols is not None,
        BLOCK_R=cfg.BLOCK_R, BLOCK_L=cfg.BLOCK_L, num_warps=cfg.num_warps)
