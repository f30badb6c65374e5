"""Fused mechanism noise: Philox uniforms -> LMO-DP (or Gaussian) noise, added to a flat buffer.

out[i] = g[i] + scale * noise(key, step, offset + i), in registers: no noise tensor is written.
Philox and the counter layout are dpkern.noise's (kernels/philox.py): the LMO sampler uses stream 1,
coordinate e takes calls e * N_BLK + j; the uniform map and the LMO transform are documented in
dpkern/mechanisms/lmo_ref.py, the float64 ground truth for every function here. The Gaussian
baseline uses kernels/philox.py's `normals` (stream 0) unchanged.
The same kernel can read its uniforms from a tensor instead (FROM_PTR) so the transform can be
tested on chosen uniforms. Flags are constexpr; GAMMA_MODE: 0 k=1, 1 k=2, 2 k=0.5, 3 Marsaglia-Tsang.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dpkern.kernels.philox import normals, philox4x32_10

_TWO_PI = tl.constexpr(6.283185307179586)  # jit globals must be constexpr objects


@dataclass(frozen=True)
class NoiseConfig:
    BLOCK: int
    num_warps: int


def noise_config(n: int) -> NoiseConfig:
    """Heuristic: 1024 elements per program (4 warps); small inputs get a smaller tile."""
    block = min(max(triton.next_power_of_2(max(n, 1)), 128), 1024)
    return NoiseConfig(BLOCK=block, num_warps=4 if block >= 512 else 2)


def noise_search_space():
    return [NoiseConfig(b, w) for b in (256, 512, 1024, 2048) for w in (2, 4, 8)]


@triton.jit
def _uniform(x):
    """uint32 -> fp32 (2m+1) / 2^24 with m = x >> 9: exact, in (0, 1)."""
    return ((x >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08


@triton.jit
def _philox_block(o_i, k0, k1, c2, c3, BLK: tl.constexpr, N_BLK: tl.constexpr):
    """Four open uniforms for global indices o_i (int64): Philox call o_i * N_BLK + BLK."""
    x = o_i * N_BLK + BLK
    c0 = (x & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((x >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2.to(tl.uint32) + zero, c3.to(tl.uint32) + zero,
                                   k0, k1)
    return _uniform(r0), _uniform(r1), _uniform(r2), _uniform(r3)


@triton.jit
def _uniform_block(u_ptr, o_l, m_l, o_i, k0, k1, c2, c3, BLK: tl.constexpr, N_BLK: tl.constexpr,
                   FROM_PTR: tl.constexpr):
    if FROM_PTR:  # test path: uniforms given as an (n, 4 * N_BLK) fp32 tensor
        p_u = u_ptr + o_l * (4 * N_BLK) + BLK * 4
        u0 = tl.load(p_u, mask=m_l, other=0.5)
        u1 = tl.load(p_u + 1, mask=m_l, other=0.5)
        u2 = tl.load(p_u + 2, mask=m_l, other=0.5)
        u3 = tl.load(p_u + 3, mask=m_l, other=0.5)
        return u0, u1, u2, u3
    else:
        return _philox_block(o_i, k0, k1, c2, c3, BLK, N_BLK)


@triton.jit
def _laplace_unit(u):
    """Laplace(0, 1) from one uniform: sign(u - 1/2) * -log(1 - 2|u - 1/2|) (all exact but log)."""
    v = u - 0.5
    mag = -tl.log(1.0 - 2.0 * tl.abs(v))
    return tl.where(v < 0, -mag, mag)


@triton.jit
def _mt_candidate(z, ua, d, c, found, g):
    """One branch-free Marsaglia-Tsang round: keep d*v from the first accepted candidate."""
    t = 1.0 + c * z
    w = t * t * t
    ok = (t > 0) & (tl.log(ua) < 0.5 * z * z + d - d * w + d * tl.log(tl.maximum(w, 1e-30)))
    g = tl.where(ok & (found == 0), d * w, g)
    found = tl.where(ok, 1, found)
    return found, g


@triton.jit
def lmo_laplace_u(u_ptr, o_l, m_l, o_i, k0, k1, c2, c3, a1_theta, a3_over_lam, a4, unif_a, unif_w,
                  mt_d, mt_c, inv_k, GAMMA_MODE: tl.constexpr, ROUNDS: tl.constexpr,
                  BOOST: tl.constexpr, N_BLK: tl.constexpr, FROM_PTR: tl.constexpr):
    """(Laplace(0, 1), u) of LMO-DP for global indices o_i (int64 block): the noise of clip norm C
    is C * lap / u. Shared by this file's sampler and kernels/noise_step.py (FROM_PTR=False there;
    u_ptr, o_l and m_l are then unused)."""
    u_e, u_u, u_lap, u_g = _uniform_block(u_ptr, o_l, m_l, o_i, k0, k1, c2, c3, 0, N_BLK, FROM_PTR)
    if GAMMA_MODE == 0:
        gam = -tl.log(u_g)
    elif GAMMA_MODE == 1:
        v0, v1, v2, v3 = _uniform_block(u_ptr, o_l, m_l, o_i, k0, k1, c2, c3, 1, N_BLK, FROM_PTR)
        gam = -tl.log(u_g) - tl.log(v0)
    elif GAMMA_MODE == 2:
        v0, v1, v2, v3 = _uniform_block(u_ptr, o_l, m_l, o_i, k0, k1, c2, c3, 1, N_BLK, FROM_PTR)
        cs = tl.cos(_TWO_PI * v0)
        gam = -tl.log(u_g) * cs * cs
    else:
        gam = tl.zeros(u_g.shape, dtype=tl.float32) + mt_d
        found = tl.zeros(u_g.shape, dtype=tl.int32)
        for r in tl.static_range(ROUNDS // 2):
            v0, v1, v2, v3 = _uniform_block(u_ptr, o_l, m_l, o_i, k0, k1, c2, c3, 1 + r, N_BLK,
                                            FROM_PTR)
            rad = tl.sqrt(-2.0 * tl.log(v0))
            found, gam = _mt_candidate(rad * tl.cos(_TWO_PI * v1), v2, mt_d, mt_c, found, gam)
            found, gam = _mt_candidate(rad * tl.sin(_TWO_PI * v1), v3, mt_d, mt_c, found, gam)
        if BOOST:
            gam = gam * tl.exp(tl.log(u_g) * inv_k)
    u = a1_theta * gam + a3_over_lam * (-tl.log(u_e)) + a4 * (unif_a + unif_w * u_u)
    return _laplace_unit(u_lap), u


@triton.jit(do_not_specialize=["offset", "k0", "k1", "c2", "c3"])
def _lmo_noise_fwd_kernel(g_ptr, out_ptr, u_ptr, n, offset, k0, k1, c2, c3, scale,
                          a1_theta, a3_over_lam, a4, unif_a, unif_w, mt_d, mt_c, inv_k,
                          GAMMA_MODE: tl.constexpr, ROUNDS: tl.constexpr, BOOST: tl.constexpr,
                          N_BLK: tl.constexpr, FROM_PTR: tl.constexpr, HAS_G: tl.constexpr,
                          BLOCK: tl.constexpr):
    i_p = tl.program_id(0).to(tl.int64)
    o_l = i_p * BLOCK + tl.arange(0, BLOCK)          # [B] local element index
    m_l = o_l < n
    o_i = o_l + offset                               # [B] global index: the RNG counter
    lap, u = lmo_laplace_u(u_ptr, o_l, m_l, o_i, k0, k1, c2, c3, a1_theta, a3_over_lam, a4, unif_a,
                           unif_w, mt_d, mt_c, inv_k, GAMMA_MODE, ROUNDS, BOOST, N_BLK, FROM_PTR)
    noise = scale * lap / u                          # [B] fp32
    if HAS_G:
        b_g = tl.load(g_ptr + o_l, mask=m_l, other=0.0).to(tl.float32)
        noise = b_g + noise
    tl.store(out_ptr + o_l, noise.to(out_ptr.dtype.element_ty), mask=m_l)


@triton.jit(do_not_specialize=["offset", "k0", "k1", "c2", "c3"])
def _gaussian_noise_fwd_kernel(g_ptr, out_ptr, n, offset, k0, k1, c2, c3, scale,
                               HAS_G: tl.constexpr, BLOCK: tl.constexpr):
    i_p = tl.program_id(0).to(tl.int64)
    o_l = i_p * BLOCK + tl.arange(0, BLOCK)
    m_l = o_l < n
    noise = scale * normals(o_l + offset, k0, k1, c2, c3)
    if HAS_G:
        noise = tl.load(g_ptr + o_l, mask=m_l, other=0.0).to(tl.float32) + noise
    tl.store(out_ptr + o_l, noise.to(out_ptr.dtype.element_ty), mask=m_l)


@triton.jit(do_not_specialize=["n", "k0", "k1", "c2", "c3"])
def _gaussian_segments_kernel(out_ptr, off_ptr, n, k0, k1, c2, c3, scale, BLOCK: tl.constexpr):
    """out[k, j] = scale * N(0, 1) of global element off[k] + j: L segments of n, one launch."""
    i_k = tl.program_id(1).to(tl.int64)
    o_l = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_l = o_l < n
    off = tl.load(off_ptr + i_k)
    tl.store(out_ptr + i_k * n + o_l, scale * normals(o_l + off, k0, k1, c2, c3), mask=m_l)


def lmo_kernel_args(consts: dict) -> dict:
    """lmo_laplace_u's float and constexpr arguments from dpkern.mechanisms.lmo_ref.kernel_constants
    (GAMMA_MODE: 0 k=1, 1 k=2, 2 k=0.5, 3 Marsaglia-Tsang)."""
    c = consts
    return dict(a1_theta=c["a1_theta"], a3_over_lam=c["a3_over_lam"], a4=c["a4"],
                unif_a=c["unif_a"], unif_w=c["unif_w"], mt_d=c["mt_d"], mt_c=c["mt_c"],
                inv_k=c["inv_k"], GAMMA_MODE=c["gamma_mode"], ROUNDS=c["rounds"],
                BOOST=bool(c["boost"]), N_BLK=c["n_blocks"])


def lmo_noise_fwd(out: torch.Tensor, g: torch.Tensor | None, *, words: dict, offset: int,
                  scale: float, consts: dict, uniforms: torch.Tensor | None = None,
                  config: NoiseConfig | None = None) -> None:
    """Launch on flat contiguous out (n,) [and g (n,), may alias out]. Caller validates; consts:
    lmo_ref.kernel_constants(params, rounds)."""
    n = out.numel()
    if n == 0:
        return
    cfg = config or noise_config(n)
    _lmo_noise_fwd_kernel[(triton.cdiv(n, cfg.BLOCK),)](
        g_ptr=g if g is not None else out, out_ptr=out,
        u_ptr=uniforms if uniforms is not None else out, n=n, offset=offset, scale=scale,
        **lmo_kernel_args(consts), FROM_PTR=uniforms is not None, **words,
        HAS_G=g is not None, BLOCK=cfg.BLOCK, num_warps=cfg.num_warps)


def gaussian_noise_fwd(out: torch.Tensor, g: torch.Tensor | None, *, words: dict, offset: int,
                       scale: float, config: NoiseConfig | None = None) -> None:
    """out = [g +] scale * N(0, 1) on flat contiguous tensors (the baseline for LMO's cost)."""
    n = out.numel()
    if n == 0:
        return
    cfg = config or noise_config(n)
    _gaussian_noise_fwd_kernel[(triton.cdiv(n, cfg.BLOCK),)](
        g_ptr=g if g is not None else out, out_ptr=out, n=n, offset=offset, scale=scale, **words,
        HAS_G=g is not None, BLOCK=cfg.BLOCK, num_warps=cfg.num_warps)


def gaussian_segments_fwd(out: torch.Tensor, offsets: torch.Tensor, *, words: dict,
                          scale: float, config: NoiseConfig | None = None) -> None:
    """out (L, n) fp32 contiguous = scale * N(0, 1) at global elements offsets[k] + j, offsets (L,)
    int64 on out's device: the same values gaussian_noise_fwd gives each segment. Caller
    validates."""
    n_seg, n = out.shape
    if n_seg == 0 or n == 0:
        return
    cfg = config or noise_config(n)
    _gaussian_segments_kernel[(triton.cdiv(n, cfg.BLOCK), n_seg)](
        out_ptr=out, off_ptr=offsets, n=n, scale=scale, **words, BLOCK=cfg.BLOCK,
        num_warps=cfg.num_warps)
