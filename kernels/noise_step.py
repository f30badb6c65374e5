"""Fused noise + optimizer step (the Triton twin of csrc/noise_step.cu).

Per element: g_noisy = (g + noise_std * z) * inv_b, then SGD or AdamW, writing the parameter and the
fp32 states in place; or, with OPT_RELEASE, g_noisy written back over the fp32 gradient and nothing
else (the noisy release pass). z never touches memory. MECH (constexpr) picks z: 0 = N(0, 1) from
Philox (kernels/philox.py, stream 0 words); 1 = LMO-DP noise of clip norm 1, Laplace(0, 1) / u,
from kernels/lmo_noise.py's device code (stream 1 words; noise_std is then the clip norm C);
2 = none (Gaussian with noise_std == 0: no z is drawn).

A program covers BLOCK_G whole Philox groups of the *global* element index (4 elements each), so the
counter of an element depends only on its global index: a shard that starts at any global offset
draws the same z as the unsharded tensor. Loads are contiguous (local index = global - offset).
One launch per tensor; the CUDA kernel does all tensors in one launch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dpkern.kernels.lmo_noise import lmo_kernel_args, lmo_laplace_u
from dpkern.kernels.philox import normals4

OPT_SGD, OPT_SGD_MOMENTUM, OPT_ADAMW, OPT_RELEASE = 0, 1, 2, 3  # DpkOptimizer in noise_step.h
MECH_GAUSSIAN, MECH_LMO, MECH_NONE = 0, 1, 2
# The LMO arguments of a Gaussian launch: unused (MECH = 0 compiles them out), fixed so the
# Gaussian kernel is compiled once.
_NO_LMO = dict(a1_theta=0.0, a3_over_lam=0.0, a4=0.0, unif_a=0.0, unif_w=0.0, mt_d=0.0, mt_c=0.0,
               inv_k=0.0, GAMMA_MODE=0, ROUNDS=2, BOOST=False, N_BLK=1)


@dataclass(frozen=True)
class NoiseStepConfig:
    BLOCK_G: int  # Philox groups per program (4 elements each)
    num_warps: int


def noise_step_config(numel: int) -> NoiseStepConfig:
    """1024 elements per program (256 groups); small tensors take a smaller block."""
    groups = min(256, max(16, triton.next_power_of_2(max(1, numel) // 4 + 1)))
    return NoiseStepConfig(BLOCK_G=groups, num_warps=4 if groups >= 256 else 2)


def noise_step_search_space():
    return [NoiseStepConfig(g, w) for g in (128, 256, 512, 1024) for w in (2, 4, 8)]


@triton.jit
def _rne_bf16(x):
    """fp32 -> bf16 with round-to-nearest-even done on the bits, then an exact cast. The GPU cast
    already rounds this way; the CPU interpreter truncates, which would drift over steps."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _noise_step_update(p_ptr, m_ptr, v_ptr, o_l, m_l, b_gn, lr, weight_decay, decay, momentum,
                       one_minus_damp, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                       step_size, inv_sqrt_bc2, OPT: tl.constexpr, NESTEROV: tl.constexpr,
                       FIRST: tl.constexpr):
    """The optimizer on the noisy gradient b_gn of elements o_l (mask m_l): p, m, v in place."""
    b_p = tl.load(p_ptr + o_l, mask=m_l, other=0.0).to(tl.float32)
    if OPT == 2:  # AdamW, decoupled weight decay
        b_m = tl.load(m_ptr + o_l, mask=m_l, other=0.0)
        b_v = tl.load(v_ptr + o_l, mask=m_l, other=0.0)
        b_p = b_p * decay
        b_m = beta1 * b_m + one_minus_beta1 * b_gn
        b_v = beta2 * b_v + one_minus_beta2 * b_gn * b_gn
        b_den = tl.sqrt(b_v) * inv_sqrt_bc2 + eps
        b_p = b_p - step_size * (b_m / b_den)
        tl.store(m_ptr + o_l, b_m, mask=m_l)
        tl.store(v_ptr + o_l, b_v, mask=m_l)
    else:  # SGD, coupled weight decay
        b_d = b_gn + weight_decay * b_p
        if OPT == 1:
            if FIRST:
                b_m = b_d
            else:
                b_m = momentum * tl.load(m_ptr + o_l, mask=m_l, other=0.0) + one_minus_damp * b_d
            tl.store(m_ptr + o_l, b_m, mask=m_l)
            if NESTEROV:
                b_d = b_d + momentum * b_m
            else:
                b_d = b_m
        b_p = b_p - lr * b_d
    if p_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(p_ptr + o_l, _rne_bf16(b_p), mask=m_l)
    else:
        tl.store(p_ptr + o_l, b_p, mask=m_l)


@triton.jit(do_not_specialize=["numel", "global_offset", "k0", "k1", "c2", "c3"])
def _noise_step_kernel(p_ptr, g_ptr, m_ptr, v_ptr, numel, global_offset,
                       k0, k1, c2, c3,
                       noise_std, inv_b, lr, weight_decay, decay, momentum, one_minus_damp,
                       beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size,
                       inv_sqrt_bc2, a1_theta, a3_over_lam, a4, unif_a, unif_w, mt_d, mt_c, inv_k,
                       OPT: tl.constexpr, NESTEROV: tl.constexpr, FIRST: tl.constexpr,
                       ALIGNED: tl.constexpr, BLOCK_G: tl.constexpr, MECH: tl.constexpr,
                       GAMMA_MODE: tl.constexpr, ROUNDS: tl.constexpr, BOOST: tl.constexpr,
                       N_BLK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    if MECH == 0:
        o_g = (global_offset >> 2) + pid * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)  # [BG]
        b_z = normals4(o_g, k0, k1, c2, c3)  # [4 BG]
    if ALIGNED:  # global_offset % 4 == 0: local index = 4 * (group - offset / 4) + lane
        o_l = pid * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G).to(tl.int64)
    else:
        o_e = ((global_offset >> 2) + pid * BLOCK_G) * 4 + tl.arange(0, 4 * BLOCK_G).to(tl.int64)
        o_l = o_e - global_offset  # local element index, [4 BG]
    m_l = (o_l >= 0) & (o_l < numel)
    if MECH == 1:  # LMO-DP: each element's own Philox calls at its global index
        b_lap, b_u = lmo_laplace_u(p_ptr, o_l, m_l, o_l + global_offset, k0, k1, c2, c3, a1_theta,
                                   a3_over_lam, a4, unif_a, unif_w, mt_d, mt_c, inv_k, GAMMA_MODE,
                                   ROUNDS, BOOST, N_BLK, False)
        b_z = b_lap / b_u  # [4 BG]
    b_g = tl.load(g_ptr + o_l, mask=m_l, other=0.0).to(tl.float32)
    if MECH != 2:
        b_g = tl.fma(noise_std, b_z, b_g)
    # The product as an fma with 0 (rounded once, the same value): the compiler cannot fuse an fma
    # result into the update's adds, so a gradient released by OPT_RELEASE and read back by a
    # noise-free step (MECH 2, inv_b 1: fma(g, 1, 0) = g) is the value formed here in one pass.
    b_gn = tl.fma(b_g, inv_b, 0.0)
    if OPT == 3:  # the release: g <- g_noisy, no parameter or state
        tl.store(g_ptr + o_l, b_gn, mask=m_l)
    else:
        _noise_step_update(p_ptr, m_ptr, v_ptr, o_l, m_l, b_gn, lr, weight_decay, decay,
                           momentum, one_minus_damp, beta1, beta2, one_minus_beta1,
                           one_minus_beta2, eps, step_size, inv_sqrt_bc2, OPT, NESTEROV, FIRST)


def noise_step_launch(p: torch.Tensor | None, g: torch.Tensor, m: torch.Tensor | None,
                      v: torch.Tensor | None, *, global_offset: int, scalars: dict, opt: int,
                      nesterov: bool, first: bool, lmo: dict | None = None,
                      config: NoiseStepConfig | None = None) -> None:
    """Update one contiguous tensor in place (opt OPT_RELEASE: p, m, v are None and the noisy
    gradient is written over g, fp32). The caller validated everything; `scalars` holds the
    kernel's float and counter arguments (built once per step by dpkern.noise.step); `lmo`, the
    LMO-DP constants (dpkern.mechanisms.lmo_ref.kernel_constants) or None for Gaussian noise,
    drawn only when scalars["noise_std"] != 0."""
    n = g.numel()
    if n == 0:
        return
    cfg = config or noise_step_config(n)
    first_group = global_offset >> 2
    last_group = (global_offset + n - 1) >> 2
    grid = (triton.cdiv(last_group - first_group + 1, cfg.BLOCK_G),)
    if lmo is not None:
        mech = dict(lmo_kernel_args(lmo), MECH=MECH_LMO)
    else:
        mech = dict(_NO_LMO, MECH=MECH_GAUSSIAN if scalars["noise_std"] != 0 else MECH_NONE)
    p = g if p is None else p  # the release reads no parameter
    _noise_step_kernel[grid](
        p_ptr=p, g_ptr=g, m_ptr=m if m is not None else p, v_ptr=v if v is not None else p,
        numel=n, global_offset=global_offset, **scalars, **mech,
        OPT=opt, NESTEROV=nesterov, FIRST=first, ALIGNED=global_offset % 4 == 0,
        BLOCK_G=cfg.BLOCK_G, num_warps=cfg.num_warps,
        # no fp contraction: the noisy gradient is rounded as written (fma, then mul), so the
        # release + noise-free update equals the one-pass step bit for bit on the GPU too
        enable_fp_fusion=False)
