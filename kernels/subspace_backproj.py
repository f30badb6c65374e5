"""Fused back-projection + optimizer update of a projected weight: W ← update(W, U S̃ Vᵀ).

W (p, d) contiguous, U (p, RU), S̃ (RU, RV) the released noisy subspace gradient (already divided by
the batch normaliser), V (d, RV). The p × d gradient G = U S̃ Vᵀ is never written: a program takes
BLOCK_P rows of W, forms [BP, RV] = U[rows] S̃ on chip once, then walks its share of the column
tiles, each time forming the [BP, BD] tile of G = (U S̃) Vᵀ in registers and applying the optimizer
in the epilogue (SGD, SGD with momentum, Adam with L2 or decoupled (AdamW) weight decay), reading
and writing W and the optimizer's states in place. Traffic per element: W and the states, read and
written once; FLOPs 2·RV per element plus 2·RU·RV per row and program. Weights of one layout go
in one launch (a third grid axis, pointer tables). Math and update rules: dpkern/subspace/README.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dpkern.kernels.noise_step import _rne_bf16
from dpkern.kernels._tables import TL_DTYPE, aligned, layer_ptr, pointer_table

OPT_SGD, OPT_SGD_MOMENTUM, OPT_ADAM = 0, 1, 2


@dataclass(frozen=True)
class SubspaceBackprojConfig:
    BLOCK_P: int
    BLOCK_D: int
    BLOCK_K: int  # chunk of RU in the U S̃ product
    n_split: int  # programs per row block, each taking a contiguous run of column tiles
    num_warps: int
    input_precision: str  # fp32 dots: "ieee" | "tf32x3" | "tf32"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def subspace_backproj_config(p: int, d: int, rank: int, device: torch.device,
                             input_precision: str | None = None) -> SubspaceBackprojConfig:
    """64 × 64 tiles (32 × 64 above rank 64; 8 warps above rank 32: [BP, RV] + [BD, RV] and the
    [BP, BD] gradient, W and state tiles stay in registers); the column tiles of a row block are
    split until ≥ 2 programs per SM run, keeping ≥ 4 tiles per program so the U S̃ product
    (RU/BD of the tile FLOPs) is amortised. Dots: the update must match the fp32 materialised
    path (plain TF32 would move it by ~1e-3 relative), so IEEE fp32 up to rank 16, where W / state
    traffic bounds the kernel, and three TF32 products ("tf32x3", held to the same fp32 policy in
    the tests) from rank 32: at r = 64 the IEEE dots made the 1B model's 113 back-projections
    18.9 ms against 7.7 ms at r = 16 (H100, bench/results/subspace_h100_f65b551)."""
    big = rank > 64
    block_p, block_d = (32, 64) if big else (64, 64)
    row_blocks = triton.cdiv(max(p, 1), block_p)
    col_tiles = triton.cdiv(max(d, 1), block_d)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, row_blocks)
        split = max(1, min(want, col_tiles // 4))
        prec = input_precision or ("tf32x3" if rank >= 32 else "ieee")
    else:  # interpreter: exact fp32 dots whatever is asked; split anyway to exercise it
        split, prec = max(1, min(2, col_tiles)), input_precision or "ieee"
    return SubspaceBackprojConfig(BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_K=32, n_split=split,
                                  num_warps=8 if rank > 32 else 4, input_precision=prec)


def subspace_backproj_search_space():
    """Enumerable configs for sweeps in bench/ (n_split is filled in from the shape)."""
    return [SubspaceBackprojConfig(bp, bd, 32, 0, w, prec) for bp in (32, 64) for bd in (64, 128)
            for w in (4, 8) for prec in ("ieee", "tf32x3")]


@triton.jit
def _store(ptr, x, mask):
    """fp32 -> the tensor's dtype; bf16 rounded to nearest even (the interpreter truncates)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, _rne_bf16(x), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _subspace_backproj_fwd_kernel(w_ptr, u_ptr, s_ptr, v_ptr, m_ptr, q_ptr,
                                  p, d, ru, rv, tiles_per_split,
                                  stride_up, stride_ur, stride_sr, stride_sc,
                                  stride_vd, stride_vr,
                                  lr, weight_decay, decay, momentum, one_minus_damp,
                                  beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size,
                                  inv_sqrt_bc2,
                                  OPT: tl.constexpr, DECOUPLED: tl.constexpr,
                                  NESTEROV: tl.constexpr, FIRST: tl.constexpr,
                                  BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                                  BLOCK_K: tl.constexpr, BLOCK_RV: tl.constexpr,
                                  PRECISION: tl.constexpr, TABLE: tl.constexpr,
                                  W_ELT: tl.constexpr, M_ELT: tl.constexpr, Q_ELT: tl.constexpr,
                                  S_ALIGNED: tl.constexpr):
    # TABLE: every *_ptr is a row of a pointer table over weights of one layout (axis 2 the
    # weight); S̃ (rows of the released (L, RU, RV) buffer) need not be aligned: S_ALIGNED says
    i_p = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_l = tl.program_id(2).to(tl.int64)
    w_ptr = layer_ptr(w_ptr, i_l, TABLE, W_ELT)
    m_ptr = layer_ptr(m_ptr, i_l, TABLE, M_ELT)
    q_ptr = layer_ptr(q_ptr, i_l, TABLE, Q_ELT)
    u_ptr = layer_ptr(u_ptr, i_l, TABLE, tl.float32)
    v_ptr = layer_ptr(v_ptr, i_l, TABLE, tl.float32)
    if TABLE:
        s_ptr = tl.load(s_ptr + i_l).to(tl.pointer_type(tl.float32))
        if S_ALIGNED:  # every S̃ row 16-byte aligned (RU·RV a multiple of 4)
            s_ptr = tl.multiple_of(s_ptr, 16)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    m_p = o_p < p
    o_rv = tl.arange(0, BLOCK_RV)
    m_rv = o_rv < rv
    # U[rows] S̃, once per program; K-loop over RU
    b_us = tl.zeros([BLOCK_P, BLOCK_RV], dtype=tl.float32)  # [BP, RV]
    for k0 in range(0, ru, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < ru
        p_u = u_ptr + o_p[:, None] * stride_up + o_k[None, :] * stride_ur
        b_u = tl.load(p_u, mask=m_p[:, None] & m_k[None, :], other=0.0).to(tl.float32)  # [BP, BK]
        p_s = s_ptr + o_k[:, None] * stride_sr + o_rv[None, :] * stride_sc
        b_s = tl.load(p_s, mask=m_k[:, None] & m_rv[None, :], other=0.0).to(tl.float32)  # [BK, RV]
        b_us += tl.dot(b_u, b_s, input_precision=PRECISION)
    n_tiles = tl.cdiv(d, BLOCK_D)
    t_lo = i_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for i_d in range(t_lo, t_hi):
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        m_d = o_d < d
        p_v = v_ptr + o_d[:, None] * stride_vd + o_rv[None, :] * stride_vr
        b_v = tl.load(p_v, mask=m_d[:, None] & m_rv[None, :], other=0.0).to(tl.float32)  # [BD, RV]
        b_g = tl.dot(b_us, tl.trans(b_v), input_precision=PRECISION)  # [BP, BD] tile of U S̃ Vᵀ
        o_w = o_p[:, None] * d + o_d[None, :]  # W and its states are contiguous (p, d)
        m_w = m_p[:, None] & m_d[None, :]
        b_w = tl.load(w_ptr + o_w, mask=m_w, other=0.0).to(tl.float32)  # [BP, BD]
        if OPT == 2:  # Adam; torch.optim.Adam's order of operations
            if DECOUPLED:  # AdamW: W ← W (1 − lr·wd) before the moment update
                b_w = b_w * decay
            else:  # Adam: L2, g ← g + wd·W
                b_g = b_g + weight_decay * b_w
            if FIRST:  # fresh zero states: not read
                b_m = one_minus_beta1 * b_g
                b_q = one_minus_beta2 * b_g * b_g
            else:
                b_m = tl.load(m_ptr + o_w, mask=m_w, other=0.0).to(tl.float32)
                b_q = tl.load(q_ptr + o_w, mask=m_w, other=0.0).to(tl.float32)
                b_m = beta1 * b_m + one_minus_beta1 * b_g
                b_q = beta2 * b_q + one_minus_beta2 * b_g * b_g
            b_den = tl.sqrt(b_q) * inv_sqrt_bc2 + eps
            b_w = b_w - step_size * (b_m / b_den)
            _store(m_ptr + o_w, b_m, m_w)
            _store(q_ptr + o_w, b_q, m_w)
        else:  # SGD: coupled weight decay, optional (Nesterov) momentum
            b_g = b_g + weight_decay * b_w
            if OPT == 1:
                if FIRST:  # torch: the buffer starts as a copy of the first gradient
                    b_m = b_g
                else:
                    b_m = momentum * tl.load(m_ptr + o_w, mask=m_w, other=0.0).to(tl.float32) \
                        + one_minus_damp * b_g
                _store(m_ptr + o_w, b_m, m_w)
                if NESTEROV:
                    b_g = b_g + momentum * b_m
                else:
                    b_g = b_m
            b_w = b_w - lr * b_g
        _store(w_ptr + o_w, b_w, m_w)


def subspace_backproj_launch(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                             m: torch.Tensor | None, q: torch.Tensor | None, *, scalars: dict,
                             opt: int, decoupled: bool, nesterov: bool, first: bool,
                             config: SubspaceBackprojConfig) -> None:
    """In place on w (p, d) contiguous and the states m, q (contiguous, w's shape; None where the
    optimizer has none). u (p, RU), s (RU, RV), v (d, RV) fp32, any strides. The caller validated
    everything; `scalars` holds the kernel's float arguments (dpkern.subspace.backproj)."""
    subspace_backproj_launch_grouped([(w, u, s, v, m, q)], scalars=scalars, opt=opt,
                                     decoupled=decoupled, nesterov=nesterov, first=first,
                                     config=config)


def subspace_backproj_launch_grouped(weights: list, *, scalars: dict, opt: int, decoupled: bool,
                                     nesterov: bool, first: bool,
                                     config: SubspaceBackprojConfig) -> None:
    """subspace_backproj_launch for L weights of one layout in ONE launch: weights = [(w, u, s,
    v, m, q)] with equal shapes, strides and dtypes (m, q: all None or all tensors), one optimizer
    rule at one step (`scalars`, `first`). Several weights go through pointer tables: w, u, v, m,
    q must be ALIGN-aligned (`tabled`); s need not be."""
    w, u, s, v, m, q = weights[0]
    p, d = w.shape
    ru, rv = u.shape[1], v.shape[1]
    if p == 0 or d == 0:
        return
    cfg = config
    col_tiles = triton.cdiv(d, cfg.BLOCK_D)
    tiles_per_split = triton.cdiv(col_tiles, cfg.n_split)
    n_split = triton.cdiv(col_tiles, tiles_per_split)  # no program without a tile
    grid = (triton.cdiv(p, cfg.BLOCK_P), n_split, len(weights))
    table = len(weights) > 1
    if table:
        rows = [[x[k] if x[k] is not None else x[0] for x in weights] for k in (0, 1, 3, 4, 5)]
        tab = pointer_table(rows, w.device, ints=[x[2].data_ptr() for x in weights])
        ops = dict(w_ptr=tab[0], u_ptr=tab[1], v_ptr=tab[2], m_ptr=tab[3], q_ptr=tab[4],
                   s_ptr=tab[5])
    else:
        ops = dict(w_ptr=w, u_ptr=u, s_ptr=s, v_ptr=v, m_ptr=m if m is not None else w,
                   q_ptr=q if q is not None else w)
    _subspace_backproj_fwd_kernel[grid](
        **ops, p=p, d=d, ru=ru, rv=rv, tiles_per_split=tiles_per_split,
        stride_up=u.stride(0), stride_ur=u.stride(1), stride_sr=s.stride(0), stride_sc=s.stride(1),
        stride_vd=v.stride(0), stride_vr=v.stride(1), **scalars,
        OPT=opt, DECOUPLED=decoupled, NESTEROV=nesterov, FIRST=first,
        BLOCK_P=cfg.BLOCK_P, BLOCK_D=cfg.BLOCK_D, BLOCK_K=cfg.BLOCK_K, BLOCK_RV=_pow2(rv),
        PRECISION=cfg.input_precision, TABLE=table, W_ELT=TL_DTYPE[w.dtype],
        M_ELT=TL_DTYPE[(m if m is not None else w).dtype],
        Q_ELT=TL_DTYPE[(q if q is not None else w).dtype],
        S_ALIGNED=table and aligned(*(x[2] for x in weights)), num_warps=cfg.num_warps)


def tabled(w, u, v, m, q) -> bool:
    """Whether a weight may go in a grouped launch (its tensors ALIGN-aligned; s is exempt)."""
    return aligned(*(x for x in (w, u, v, m, q) if x is not None))
