"""Ghost norm: per-sample ‖g_iᵀ a_i‖²_F = ⟨a_i a_iᵀ, g_i g_iᵀ⟩_F, fused, T × T never in HBM.

One program owns one (t-tile, s-tile) pair of one sample, with t-tile ≤ s-tile: both Grams are
symmetric, so an off-diagonal tile pair stands for itself and its mirror (weight 2). It builds the
[BT, BT] tile of a aᵀ on chip (K-loop over d), then for each of up to MAX_G output gradients that
share the input a (q/k/v, gate/up) the tile of g gᵀ (K-loop over p), and reduces the elementwise
product to one fp32 partial. Partials (NUM_G, B, n_pairs) are summed in fp64 on the host side: deterministic,
no atomics. Math and FLOP model: kernels/README_persample.md.

fp32 inputs (precision modes shared by every per-sample kernel, `fp32_mode`):
* "tf32r" (default on GPU): every fp32 operand is rounded to TF32 by `_round_tf32` (round to nearest
  even onto a 10-bit mantissa, integer ops on the bits: ours, not the hardware's), then tl.dot runs
  in TF32. TF32 × TF32 products are exact in fp32, so the norm is that of the very operands the
  book-keeping kernel (same rounding) sums: the two differ by fp32 accumulation error only.
* "ieee": exact fp32 products (no tensor cores). "tf32x3": three TF32 products (≈ fp32).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from dpkern.kernels._tables import TL_DTYPE, layer_ptr, shared_input_args

MAX_G = 3  # gradients sharing one input Gram per launch; larger groups launch again


# fp32 modes a launch accepts. The env knobs (DPKERN_NORM_FP32_DOT, DPKERN_FP32_DOT) are read by
# dpkern.ops, which passes the resolved mode; plain "tf32" (the hardware rounds the operands, so
# norm and book-keeping may see different ones) is for tests and benchmarks only: dpkern.ops refuses it.
KERNEL_MODES = ("tf32r", "ieee", "tf32x3", "tf32")


@dataclass(frozen=True)
class GhostNormConfig:
    BLOCK_T: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    fp32_dot: str | None = None  # fp32 mode (KERNEL_MODES); None: the launch's fp32_mode


# 128-row tiles need this many programs (tile pairs x samples x layers) to fill the GPU: two
# waves of an H100's 132 SMs.
_MIN_PROGRAMS_128 = 264


def ghost_norm_config(seq: int, batch: int = 1, layers: int = 1,
                      fp32: bool = False) -> GhostNormConfig:
    """Heuristic: 128-row tiles from T ≥ 1024, and from T ≥ 256 when the launch has programs
    enough for them (a grouped launch over a model's layers); else 64-row tiles (more programs).
    H100, 16 layers of the 1B Llama (bench/results/norm_probe_h100_2b630f3): at 8x512 the
    128-row tiles with 64-wide K steps, 8 warps take the q/k/v norms from 1.04 to 0.73 ms in bf16
    and from 3.29 to 2.69 ms in fp32; at 16x256 0.64 -> 0.50 and 1.88 -> 1.68 ms; at 32x128
    (one 128-row tile per sample) the 64-row tiles stay faster."""
    if seq >= 1024:
        return GhostNormConfig(BLOCK_T=128, BLOCK_K=32, num_warps=8, num_stages=3)
    pairs = (triton.cdiv(seq, 128) * (triton.cdiv(seq, 128) + 1)) // 2
    if seq >= 256 and pairs * batch * layers >= _MIN_PROGRAMS_128:
        return GhostNormConfig(BLOCK_T=128, BLOCK_K=64, num_warps=8, num_stages=3 if fp32 else 4)
    return GhostNormConfig(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3)


def ghost_norm_search_space():
    """Enumerable configs for autotuning sweeps in bench/."""
    return [GhostNormConfig(bt, bk, w, s) for bt in (64, 128) for bk in (32, 64)
            for w in (4, 8) for s in (2, 3, 4)]


@lru_cache(maxsize=64)
def tile_pairs(n_tiles: int, device_str: str) -> torch.Tensor:
    """Upper-triangle (t, s) tile pairs, t ≤ s, as an int32 tensor (n_pairs, 2)."""
    idx = torch.triu_indices(n_tiles, n_tiles).t().contiguous().to(torch.int32)
    if torch.device(device_str).type == "cuda":  # pinned + non_blocking: no host-GPU sync
        return idx.pin_memory().to(device_str, non_blocking=True)
    return idx.to(device_str)


@triton.jit
def _round_tf32(x):
    """fp32 -> the nearest TF32 value (ties to even), still stored as fp32: the low 13 mantissa bits
    become 0. Integer ops on the bits, so the result is a fixed function of x on every device
    (torch twin: dpkern.ops._persample.round_tf32). NaN stays NaN; overflow rounds to ±inf."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0xFFF + ((bits >> 13) & 1)) >> 13) << 13
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _gram_tile(x_ptr, y_ptr, o_t, o_s, m_t, m_s, width, stride_xt, stride_xk, stride_yt,
               stride_yk, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ROUND_X: tl.constexpr,
               ROUND_Y: tl.constexpr):
    """x[o_t, :] @ y[o_s, :]ᵀ over `width` columns, fp32 accumulation. -> [BT, BS].
    ROUND_X / ROUND_Y: round that operand to TF32 (fp32 inputs in "tf32r" mode)."""
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
        if ROUND_X:
            b_x = _round_tf32(b_x.to(tl.float32))
        if ROUND_Y:
            b_y = _round_tf32(b_y.to(tl.float32))
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
                           UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ROUND: tl.constexpr,
                           TABLE: tl.constexpr, ELT: tl.constexpr):
    # TABLE: a_ptr and g*_ptr are pointer tables over layers (kernels/_tables.py), axis 2 the layer
    i_pair = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    i_l = tl.program_id(2).to(tl.int64)
    a_ptr = layer_ptr(a_ptr, i_l, TABLE, ELT)
    g0_ptr = layer_ptr(g0_ptr, i_l, TABLE, ELT)
    i_t = tl.load(pairs_ptr + 2 * i_pair)
    i_s = tl.load(pairs_ptr + 2 * i_pair + 1)
    weight = tl.where(i_t == i_s, 1.0, 2.0)
    o_t = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    o_s = (i_s * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    m_t = o_t < seq
    m_s = o_s < seq
    p_a = a_ptr + i_b * stride_ab
    b_ga = _gram_tile(p_a, p_a, o_t, o_s, m_t, m_s, d, stride_at, stride_ad, stride_at, stride_ad,
                      BLOCK_T, BLOCK_T, BLOCK_K, UPCAST, DOT_PREC, ROUND, ROUND)  # [BT, BT]
    # partials (L, NUM_G, B, n_pairs)
    p_out = part_ptr + (i_l * NUM_G * batch + i_b) * n_pairs + i_pair
    b_gg = _gram_tile(g0_ptr + i_b * stride_g0b, g0_ptr + i_b * stride_g0b, o_t, o_s, m_t, m_s, p0,
                      stride_g0t, stride_g0p, stride_g0t, stride_g0p,
                      BLOCK_T, BLOCK_T, BLOCK_K, UPCAST, DOT_PREC, ROUND, ROUND)
    tl.store(p_out, weight * tl.sum(tl.sum(b_ga * b_gg, axis=1), axis=0))
    if NUM_G >= 2:
        g1_ptr = layer_ptr(g1_ptr, i_l, TABLE, ELT)
        b_gg = _gram_tile(g1_ptr + i_b * stride_g1b, g1_ptr + i_b * stride_g1b, o_t, o_s, m_t, m_s,
                          p1, stride_g1t, stride_g1p, stride_g1t, stride_g1p,
                          BLOCK_T, BLOCK_T, BLOCK_K, UPCAST, DOT_PREC, ROUND, ROUND)
        tl.store(p_out + batch * n_pairs, weight * tl.sum(tl.sum(b_ga * b_gg, axis=1), axis=0))
    if NUM_G >= 3:
        g2_ptr = layer_ptr(g2_ptr, i_l, TABLE, ELT)
        b_gg = _gram_tile(g2_ptr + i_b * stride_g2b, g2_ptr + i_b * stride_g2b, o_t, o_s, m_t, m_s,
                          p2, stride_g2t, stride_g2p, stride_g2t, stride_g2p,
                          BLOCK_T, BLOCK_T, BLOCK_K, UPCAST, DOT_PREC, ROUND, ROUND)
        tl.store(p_out + 2 * batch * n_pairs,
                 weight * tl.sum(tl.sum(b_ga * b_gg, axis=1), axis=0))


def resolve_mode(explicit, cfg_mode, device) -> str:
    """The fp32 mode of one launch: explicit argument > config > "tf32r" on CUDA, else "ieee"."""
    mode = explicit or cfg_mode or ("tf32r" if torch.device(device).type == "cuda" else "ieee")
    if mode not in KERNEL_MODES:
        raise ValueError(f"fp32_mode must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


def dot_precision(mode: str, *xs: torch.Tensor) -> str:
    """input_precision for tl.dot: irrelevant for 16-bit inputs (exact products, fp32 accumulate);
    the interpreter's dot is exact fp32 whatever it is told. "tf32r" runs TF32 on TF32 operands."""
    if xs[0].device.type == "cuda" and any(x.dtype == torch.float32 for x in xs):
        return "tf32" if mode == "tf32r" else mode
    return "ieee"


def rounds(mode: str, *xs: torch.Tensor) -> bool:
    """Whether the kernel rounds its operands to TF32: "tf32r" with an fp32 operand (16-bit operands
    are already TF32 values, so rounding them too is a no-op that keeps one code path)."""
    return mode == "tf32r" and any(x.dtype == torch.float32 for x in xs)


def ghost_norm_fwd(a: torch.Tensor, gs: list, outs: list,
                   config: GhostNormConfig | None = None, empty=torch.empty,
                   fp32_mode: str | None = None) -> None:
    """a (B, T, d), each gs[k] (B, T, p_k) -> writes outs[k] (B,) fp32. Caller validates; B, T > 0.
    outs: a list of (B,) tensors, or one (len(gs), B) fp32 tensor (one reduction per launch).
    `empty(*shape, dtype=, device=)` allocates the partials (tests pass a poisoning allocator).
    fp32_mode: "tf32r" | "ieee" | "tf32x3" (default: the config's, else tf32r on CUDA)."""
    if isinstance(outs, torch.Tensor):
        _launch([a], [gs], outs.view(1, *outs.shape), config, empty, fp32_mode)
        return
    out = empty(1, len(gs), a.shape[0], dtype=torch.float32, device=a.device)
    _launch([a], [gs], out, config, empty, fp32_mode)
    for k, o in enumerate(outs):
        o.copy_(out[0, k])


def ghost_norm_grouped_fwd(as_: list, gss: list, out: torch.Tensor,
                           config: GhostNormConfig | None = None, empty=torch.empty,
                           fp32_mode: str | None = None) -> None:
    """L layers in one launch per MAX_G gradients: as_[l] (B, T, d), gss[l][k] (B, T, p_k) ->
    out (L, K, B) fp32. Every as_[l] has one shape, strides and dtype; so has gss[l][k] for each k,
    in a's dtype (kernels/_tables.layout_key). Caller validates; B, T > 0."""
    _launch(as_, gss, out, config, empty, fp32_mode)


def _launch(as_, gss, out, config, empty, fp32_mode) -> None:
    a, gs = as_[0], gss[0]
    n_layers = len(as_)
    bsz, seq, _ = a.shape
    cfg = config or ghost_norm_config(seq, bsz, n_layers,
                                      any(x.dtype == torch.float32 for x in [a, *gs]))
    mode = resolve_mode(fp32_mode, cfg.fp32_dot, a.device)
    n_tiles = triton.cdiv(seq, cfg.BLOCK_T)
    pairs = tile_pairs(n_tiles, str(a.device))
    n_pairs = pairs.shape[0]
    upcast = a.device.type != "cuda"  # the interpreter mishandles 16-bit dots
    prec = dot_precision(mode, a, *gs)
    round_ = rounds(mode, a, *gs)
    for ks, args in shared_input_args(as_, gss, MAX_G):
        part = empty(n_layers, len(ks), bsz, n_pairs, dtype=torch.float32, device=a.device)
        _ghost_norm_fwd_kernel[(n_pairs, bsz, n_layers)](
            **args, pairs_ptr=pairs, part_ptr=part, n_pairs=n_pairs, NUM_G=len(ks),
            BLOCK_T=cfg.BLOCK_T, BLOCK_K=cfg.BLOCK_K, UPCAST=upcast, DOT_PREC=prec, ROUND=round_,
            TABLE=n_layers > 1, ELT=TL_DTYPE[a.dtype], num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        out[:, ks[0]:ks[-1] + 1].copy_(part.sum(dim=3, dtype=torch.float64))
