"""Per-sample ‖g_iᵀ a_i‖²_F by instantiation: each [BP, BD] tile of G_i = g_iᵀ a_i is formed on chip
(K-loop over the T tokens of sample i), squared and reduced to one fp32 partial; G_i never reaches
HBM. Cheaper than the ghost norm when T(d+p) > 2dp (long sequences, narrow layers).
Partials (B, n_p_tiles · n_d_tiles) are summed in fp64 on the host side: deterministic, no atomics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dpkern.kernels.ghost_norm import _round_tf32, dot_precision, resolve_mode, rounds


@dataclass(frozen=True)
class InstantiateNormConfig:
    BLOCK_P: int
    BLOCK_D: int
    BLOCK_T: int
    num_warps: int
    num_stages: int
    fp32_dot: str | None = None  # fp32 mode (ghost_norm.KERNEL_MODES); None: the launch's


def instantiate_norm_config(seq: int, d: int, p: int) -> InstantiateNormConfig:
    """Heuristic: 128 × 128 output tiles for wide layers, 64 × 64 for narrow ones."""
    if min(d, p) >= 1024:
        return InstantiateNormConfig(BLOCK_P=128, BLOCK_D=128, BLOCK_T=32, num_warps=8,
                                     num_stages=3)
    return InstantiateNormConfig(BLOCK_P=64, BLOCK_D=64, BLOCK_T=32, num_warps=4, num_stages=3)


def instantiate_norm_search_space():
    """Enumerable configs for autotuning sweeps in bench/."""
    return [InstantiateNormConfig(bp, bd, bt, w, s) for bp in (64, 128) for bd in (64, 128)
            for bt in (32, 64) for w in (4, 8) for s in (3, 4)]


@triton.jit
def _instantiate_norm_fwd_kernel(a_ptr, g_ptr, part_ptr, seq, d, p,
                                 stride_ab, stride_at, stride_ad,
                                 stride_gb, stride_gt, stride_gp,
                                 BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_T: tl.constexpr, UPCAST: tl.constexpr,
                                 DOT_PREC: tl.constexpr, ROUND: tl.constexpr):
    i_p = tl.program_id(0)
    i_d = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_p = (i_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    o_d = (i_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    o_t = tl.arange(0, BLOCK_T)
    m_p = o_p < p
    m_d = o_d < d
    p_a0 = a_ptr + i_b * stride_ab
    p_g0 = g_ptr + i_b * stride_gb
    b_acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for t0 in range(0, seq, BLOCK_T):
        o_tt = (t0 + o_t).to(tl.int64)
        m_t = o_tt < seq
        b_g = tl.load(p_g0 + o_p[:, None] * stride_gp + o_tt[None, :] * stride_gt,
                      mask=m_p[:, None] & m_t[None, :], other=0.0)  # [BP, BT] = g_iᵀ tile
        b_a = tl.load(p_a0 + o_tt[:, None] * stride_at + o_d[None, :] * stride_ad,
                      mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
        if UPCAST:
            b_g = b_g.to(tl.float32)
            b_a = b_a.to(tl.float32)
        if ROUND:  # the same TF32 operands as the book-keeping kernel
            b_g = _round_tf32(b_g.to(tl.float32))
            b_a = _round_tf32(b_a.to(tl.float32))
        b_acc = tl.dot(b_g, b_a, b_acc, input_precision=DOT_PREC)
    n_tiles = tl.num_programs(0) * tl.num_programs(1)
    tl.store(part_ptr + i_b * n_tiles + i_p * tl.num_programs(1) + i_d,
             tl.sum(tl.sum(b_acc * b_acc, axis=1), axis=0))


def instantiate_norm_fwd(a: torch.Tensor, g: torch.Tensor, out: torch.Tensor,
                         config: InstantiateNormConfig | None = None, empty=torch.empty,
                         fp32_mode: str | None = None) -> None:
    """a (B, T, d), g (B, T, p) -> writes out (B,) fp32. Caller validates; B, T > 0.
    `empty(*shape, dtype=, device=)` allocates the partials (tests pass a poisoning allocator).
    fp32_mode: "tf32r" | "ieee" | "tf32x3" (default: the config's, else tf32r on CUDA)."""
    bsz, seq, d = a.shape
    p = g.shape[2]
    cfg = config or instantiate_norm_config(seq, d, p)
    mode = resolve_mode(fp32_mode, cfg.fp32_dot, a.device)
    grid = (triton.cdiv(p, cfg.BLOCK_P), triton.cdiv(d, cfg.BLOCK_D), bsz)
    part = empty(bsz, grid[0] * grid[1], dtype=torch.float32, device=a.device)
    _instantiate_norm_fwd_kernel[grid](
        a_ptr=a, g_ptr=g, part_ptr=part, seq=seq, d=d, p=p,
        stride_ab=a.stride(0), stride_at=a.stride(1), stride_ad=a.stride(2),
        stride_gb=g.stride(0), stride_gt=g.stride(1), stride_gp=g.stride(2),
        BLOCK_P=cfg.BLOCK_P, BLOCK_D=cfg.BLOCK_D, BLOCK_T=cfg.BLOCK_T,
        # tl.dot needs one operand dtype: mixed inputs are upcast (as on the CPU interpreter).
        UPCAST=a.device.type != "cuda" or a.dtype != g.dtype,
        DOT_PREC=dot_precision(mode, a, g), ROUND=rounds(mode, a, g),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out.copy_(part.sum(dim=1, dtype=torch.float64))  # fp64 sum of partials: 1 rounding
