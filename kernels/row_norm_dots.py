"""Σ_t ‖a_bt‖·‖g_kbt‖ for up to three tensors g_k that share the input a (the no-cancellation
bound of dpkern/layers/bounds.py, one launch per group instead of ~3 torch ops per tensor).

Row norms: fp32 sums of squares (any order: relative error ≤ γ_n), correctly rounded sqrt
(tl.sqrt_rn; tl.sqrt may be an approximation); products in fp32; the sum over t in fp64, per
block of BLOCK_T rows, written as partials (K, B, n_blocks) and summed by the launcher in fp64
(deterministic, no atomics). One program per (row block, sample)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dpkern.kernels._tables import TL_DTYPE, layer_ptr, shared_input_args

MAX_G = 3


@dataclass(frozen=True)
class RowNormDotsConfig:
    BLOCK_T: int
    BLOCK_C: int
    num_warps: int


def row_norm_dots_config(seq: int) -> RowNormDotsConfig:
    block_t = min(16, max(triton.next_power_of_2(max(seq, 1)), 1))
    return RowNormDotsConfig(BLOCK_T=block_t, BLOCK_C=128, num_warps=4)


@triton.jit
def _row_norms(x_ptr, stride_t, stride_c, o_t, m_t, n_cols,
               BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BT] fp32 Euclidean norms of rows o_t of x (masked rows give 0)."""
    b_acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        o_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        m = m_t[:, None] & (o_c[None, :] < n_cols)
        b_x = tl.load(x_ptr + o_t[:, None] * stride_t + o_c[None, :] * stride_c, mask=m,
                      other=0.0).to(tl.float32)
        b_acc += b_x * b_x
    return tl.sqrt_rn(tl.sum(b_acc, axis=1))


@triton.jit
def _row_norm_dots_kernel(a_ptr, g0_ptr, g1_ptr, g2_ptr, part_ptr, seq, d, p0, p1, p2, batch,
                          n_blocks, stride_ab, stride_at, stride_ad,
                          stride_g0b, stride_g0t, stride_g0p, stride_g1b, stride_g1t, stride_g1p,
                          stride_g2b, stride_g2t, stride_g2p,
                          NUM_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                          TABLE: tl.constexpr, ELT: tl.constexpr):
    # TABLE: a_ptr and g*_ptr are pointer tables over layers (kernels/_tables.py), axis 2 the layer
    i_t = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    i_l = tl.program_id(2).to(tl.int64)
    a_ptr = layer_ptr(a_ptr, i_l, TABLE, ELT)
    g0_ptr = layer_ptr(g0_ptr, i_l, TABLE, ELT)
    o_t = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    m_t = o_t < seq
    b_na = _row_norms(a_ptr + i_b * stride_ab, stride_at, stride_ad, o_t, m_t, d, BLOCK_T, BLOCK_C)
    p_out = part_ptr + (i_l * NUM_G * batch + i_b) * n_blocks + i_t  # partials (L, K, B, blocks)
    b_ng = _row_norms(g0_ptr + i_b * stride_g0b, stride_g0t, stride_g0p, o_t, m_t, p0,
                      BLOCK_T, BLOCK_C)
    tl.store(p_out, tl.sum((b_na * b_ng).to(tl.float64), axis=0))
    if NUM_G >= 2:
        g1_ptr = layer_ptr(g1_ptr, i_l, TABLE, ELT)
        b_ng = _row_norms(g1_ptr + i_b * stride_g1b, stride_g1t, stride_g1p, o_t, m_t, p1,
                          BLOCK_T, BLOCK_C)
        tl.store(p_out + batch * n_blocks, tl.sum((b_na * b_ng).to(tl.float64), axis=0))
    if NUM_G >= 3:
        g2_ptr = layer_ptr(g2_ptr, i_l, TABLE, ELT)
        b_ng = _row_norms(g2_ptr + i_b * stride_g2b, stride_g2t, stride_g2p, o_t, m_t, p2,
                          BLOCK_T, BLOCK_C)
        tl.store(p_out + 2 * batch * n_blocks, tl.sum((b_na * b_ng).to(tl.float64), axis=0))


def row_norm_dots_fwd(a: torch.Tensor, gs: list, out: torch.Tensor, empty=torch.empty,
                      config: RowNormDotsConfig | None = None) -> None:
    """a (B, T, d), gs[k] (B, T, p_k) -> out (len(gs), B) fp64. Caller validates; B, T > 0."""
    _launch([a], [gs], out.view(1, *out.shape), empty, config)


def row_norm_dots_grouped_fwd(as_: list, gss: list, out: torch.Tensor, empty=torch.empty,
                              config: RowNormDotsConfig | None = None) -> None:
    """L layers in one launch per MAX_G gradients: as_[l] (B, T, d), gss[l][k] (B, T, p_k) ->
    out (L, K, B) fp64. Every as_[l] has one layout, so has gss[l][k] for each k, in a's dtype
    (kernels/_tables.py). Caller validates; B, T > 0."""
    _launch(as_, gss, out, empty, config)


def _launch(as_, gss, out, empty, config) -> None:
    a = as_[0]
    n_layers = len(as_)
    bsz, seq, _ = a.shape
    cfg = config or row_norm_dots_config(seq)
    n_blocks = triton.cdiv(seq, cfg.BLOCK_T)
    for ks, args in shared_input_args(as_, gss, MAX_G):
        part = empty(n_layers, len(ks), bsz, n_blocks, dtype=torch.float64, device=a.device)
        _row_norm_dots_kernel[(n_blocks, bsz, n_layers)](
            **args, part_ptr=part, n_blocks=n_blocks, NUM_G=len(ks), BLOCK_T=cfg.BLOCK_T,
            BLOCK_C=cfg.BLOCK_C, TABLE=n_layers > 1, ELT=TL_DTYPE[a.dtype],
            num_warps=cfg.num_warps)
        out[:, ks[0]:ks[-1] + 1].copy_(part.sum(dim=3))
