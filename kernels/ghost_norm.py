"""Ghost norm: per-sample ‖g_iᵀ a_i‖²_F = ⟨a_i a_iᵀ, g_i g_iᵀ⟩_F, fused, T × T never in HBM.

One program owns one (t-tile, s-tile) pair of one sample, with t-tile ≤ s-tile: both Grams are
symmetric, so an off-diagonal tile pair stands for itself and its mirror (weight 2). It builds the
[BT, BT] tile of a aᵀ on chip (K-loop over d), then for each of up to MAX_G output gradients that
share the input a (q/k/v, gate/up) the tile of g gᵀ (K-loop over p), and reduces the elementwise
product to one fp32 partial. Partials (NUM_G, B, n_pairs) are summed on the host side: deterministic,
no atomics. Math and FLOP model: kernels/README_persample.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

MAX_G = 3  # gradients sharing one input Gram per launch; larger groups launch again


@dataclass(frozen=True)
class GhostNormConfig:
    BLOCK_T: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    fp32_dot: str = "ieee"  # tl.dot input_precision for fp32 inputs: "ieee" | "tf32x3"


def norm_fp32_dot() -> str:
    """input_precision of the norm kernels for fp32 inputs: "ieee" unless DPKERN_NORM_FP32_DOT says
    "tf32x3" (≈ fp32 accuracy on tensor cores). Plain "tf32" is refused: it can under-estimate."""
    val = os.environ.get("DPKERN_NORM_FP32_DOT", "ieee")
    if val not in ("ieee", "tf32x3"):
        raise ValueError(f"DPKERN_NORM_FP32_DOT must be 'ieee' or 'tf32x3', got {val!r}")
    return val


def ghost_norm_config(seq: int) -> GhostNormConfig:
    """Heuristic: 64-row tiles for short sequences (more programs), 128 from T ≥ 1024."""
    if seq >= 1024:
        return GhostNormConfig(BLOCK_T=128, BLOCK_K=32, num_warps=8, num_stages=3,
                               fp32_dot=norm_fp32_dot())
    return GhostNormConfig(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3,
                           fp32_dot=norm_fp32_dot())


def ghost_norm_search_space():
    """Enumerable configs for autotuning sweeps in bench/."""
    return [GhostNormConfig(bt, bk, w, s) for bt in (64, 128) for bk in (32, 64)
            for w in (4, 8) for s in (2, 3, 4)]


@lru_cache(maxsize=64)
def tile_pairs(n_tiles: int, device_str: str) -> torch.Tensor:
    """Upper-triangle (t, s) tile pairs, t ≤ s, as an int32 tensor (n_pairs, 2)."""
    idx = torch.triu_indices(n_tiles, n_tiles)
    return idx.t().contiguous().to(device=device_str, dtype=torch.int32)


@triton.jit
def _gram_tile(x_ptr, y_ptr, o_t, o_s, m_t, m_s, width, stride_xt, stride_xk, stride_yt,
               stride_yk, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """x[o_t, :] @ y[o_s, :]ᵀ over `width` columns, fp32 accumulation. -> [BT, BS]."""
    b_acc = tl.zeros([BLOCK_T, BLOCK_S], dtype=tl.float32)
    o_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, width, BLOCK_K):
        m_k = (k0 + o_k) < width
        p_x = x_ptr + o_t[:, None] * stride_xt + (k0 + o_k)[None, :].to(tl.int64) * stride_xk
        p_y = y_ptr + o_s[None, :] * stride_yt + (k0 + o_k)[:, None].to(tl.int64) * stride_yk
        b_x = tl.load(p_x, mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
        b_y = tl.load(p_y, mask=m_k[:, None] & m_s[None, :], other=0.0)  # [BK, BS]
        if UPCAST:
            b_x = b_x.to(tl.float32)
            b_y = b_y.to(tl.float32)
        b_acc = tl.dot(b_x, b_y, b_acc, input_precision=DOT_PREC)
    return b_acc


@triton.jit
def _ghost_norm_fwd_kernel(a_ptr, g0_ptr, g1_ptr, g2_ptr, pairs_ptr, part_ptr,
                           seq, d, p0, p1, p2, n_pairs, batch,
                           stride_ab, stride_at, stride_ad,
                           stride_g0b, stride_g0t, stride_g0p,
                           stride_g1b, stride_g1t, stride_g1p,
                           stride_g2b, stride_g2t, stride_g2p,
                           NUM_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                           UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    i_pair = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    i_t = tl.load(pairs_ptr + 2 * i_pair)
    i_s = tl.load(pairs_ptr + 2 * i_pair + 1)
    weight = tl.where(i_t == i_s, 1.0, 2.0)
    o_t = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    o_s = (i_s * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    m_t = o_t < seq
    m_s = o_s < seq
    p_a = a_ptr + i_b * stride_ab
    b_ga = _gram_tile(p_a, p_a, o_t, o_s, m_t, m_s, d, stride_at, stride_ad, stride_at, stride_ad,
                      BLOCK_T, BLOCK_T, BLOCK_K, UPCAST, DOT_PREC)  # [BT, BT]
    p_out = part_ptr + i_b * n_pairs + i_pair
    b_gg = _gram_tile(g0_ptr + i_b * stride_g0b, g0_ptr + i_b * stride_g0b, o_t, o_s, m_t, m_s, p0,
                      stride_g0t, stride_g0p, stride_g0t, stride_g0p,
                      BLOCK_T, BLOCK_T, BLOCK_K, UPCAST, DOT_PREC)
    tl.store(p_out, weight * tl.sum(tl.sum(b_ga * b_gg, axis=1), axis=0))
    if NUM_G >= 2:
        b_gg = _gram_tile(g1_ptr + i_b * stride_g1b, g1_ptr + i_b * stride_g1b, o_t, o_s, m_t, m_s,
                          p1, stride_g1t, stride_g1p, stride_g1t, stride_g1p,
                          BLOCK_T, BLOCK_T, BLOCK_K, UPCAST, DOT_PREC)
        tl.store(p_out + batch * n_pairs, weight * tl.sum(tl.sum(b_ga * b_gg, axis=1), axis=0))
    if NUM_G >= 3:
        b_gg = _gram_tile(g2_ptr + i_b * stride_g2b, g2_ptr + i_b * stride_g2b, o_t, o_s, m_t, m_s,
                          p2, stride_g2t, stride_g2p, stride_g2t, stride_g2p,
                          BLOCK_T, BLOCK_T, BLOCK_K, UPCAST, DOT_PREC)
        tl.store(p_out + 2 * batch * n_pairs,
                 weight * tl.sum(tl.sum(b_ga * b_gg, axis=1), axis=0))


def dot_precision(fp32_dot: str, *xs: torch.Tensor) -> str:
    """input_precision for tl.dot: irrelevant for 16-bit inputs (exact products, fp32 accumulate)."""
    if xs[0].device.type == "cuda" and any(x.dtype == torch.float32 for x in xs):
        return fp32_dot
    return "ieee"


def ghost_norm_fwd(a: torch.Tensor, gs: list, outs: list,
                   config: GhostNormConfig | None = None, empty=torch.empty) -> None:
    """a (B, T, d), each gs[k] (B, T, p_k) -> writes outs[k] (B,) fp32. Caller validates; B, T > 0.
    `empty(*shape, dtype=, device=)` allocates the partials (tests pass a poisoning allocator)."""
    bsz, seq, d = a.shape
    cfg = config or ghost_norm_config(seq)
    n_tiles = triton.cdiv(seq, cfg.BLOCK_T)
    pairs = tile_pairs(n_tiles, str(a.device))
    n_pairs = pairs.shape[0]
    upcast = a.device.type != "cuda"  # the interpreter mishandles 16-bit dots
    prec = dot_precision(cfg.fp32_dot, a, *gs)
    for start in range(0, len(gs), MAX_G):
        group = gs[start:start + MAX_G]
        padded = group + [group[0]] * (MAX_G - len(group))
        part = empty(len(group), bsz, n_pairs, dtype=torch.float32, device=a.device)
        args = dict(a_ptr=a, pairs_ptr=pairs, part_ptr=part, seq=seq, d=d, n_pairs=n_pairs,
                    batch=bsz, stride_ab=a.stride(0), stride_at=a.stride(1), stride_ad=a.stride(2))
        for k, g in enumerate(padded):
            args.update({f"g{k}_ptr": g, f"p{k}": g.shape[2], f"stride_g{k}b": g.stride(0),
                         f"stride_g{k}t": g.stride(1), f"stride_g{k}p": g.stride(2)})
        _ghost_norm_fwd_kernel[(n_pairs, bsz)](
            **args, NUM_G=len(group), BLOCK_T=cfg.BLOCK_T, BLOCK_K=cfg.BLOCK_K, UPCAST=upcast,
            DOT_PREC=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        for k in range(len(group)):
            torch.sum(part[k], dim=1, out=outs[start + k])
