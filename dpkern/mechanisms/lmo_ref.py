"""Plain-PyTorch ground truth for the mechanism samplers (float64, slow, obviously correct).

Counter layout (shared with kernels/lmo_noise.py): Philox4x32-10 with key (k0, k1) = the 64-bit
secret key, counter = (i mod 2^32, i >> 32, step, TAG << 24 | block) for global element index i;
each call gives 4 uint32, each mapped to the open-interval uniform (2m+1) / 2^24, m = x >> 9
(exact in fp32, never 0 or 1, symmetric about 1/2). TAG separates mechanisms (Gaussian 0, LMO 1),
so no (key, counter) pair is shared between them.
TODO(issue 6): when dpkern/noise's Philox reference and kernels/philox.py land, take the Philox and
the uniform map from there (this private copy exists only so the fused kernel is testable now).

LMO-DP per coordinate (uniforms U[:, j], j = 4 * block + lane):
  j=0 Exp(rate lam) = -log(U0)/lam,  j=1 Uniform(a, b) = a + (b - a) U1,  j=2 Laplace sign/magnitude,
  Gamma(k, theta) by ``gamma_mode(k)``:
    "k1"  (k = 1):   -log(U3)                       1 block
    "k2"  (k = 2):   -log(U3) - log(U4)             2 blocks
    "k05" (k = 0.5): -log(U3) cos^2(2 pi U4)   (= Z^2/2, Box-Muller)    2 blocks
    "mt"  (other k): Marsaglia-Tsang, `rounds` candidates, branch-free (first accepted wins;
                     if none is, the value d, probability <= 0.05^rounds for k >= 1); k < 1 uses
                     Gamma(k+1) * U3^(1/k). Block 1 + r feeds candidates 2r, 2r+1:
                     Box-Muller normals from (U, U') and acceptance uniforms U'', U'''.
  u = a1 theta Gamma + a3 Exp + a4 Uniform;  noise = sign(U2 - 1/2) * (-log(1 - 2|U2 - 1/2|)) / u.
"""
from __future__ import annotations

import math

import torch

from dpkern.mechanisms.lmo_params import LMOParams

_M = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
TAG_GAUSSIAN, TAG_LMO = 0, 1
DEFAULT_ROUNDS = 8


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and int64 b < 2^32, no overflow."""
    p0 = a * (b & 0xFFFF)                 # < 2^48
    p1 = a * (b >> 16)                    # < 2^48
    t = (p0 >> 16) + p1                   # a*b = t * 2^16 + (p0 & 0xFFFF)
    return t >> 16, (((t & 0xFFFF) << 16) | (p0 & 0xFFFF))


def philox4x32_ref(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values. Returns 4 int64 tensors."""
    c = [torch.as_tensor(x, dtype=torch.int64) & _M for x in (c0, c1, c2, c3)]
    c0, c1, c2, c3 = torch.broadcast_tensors(*c)
    k0, k1 = int(k0) & _M, int(k1) & _M
    for _ in range(rounds):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M, (k1 + _KEY_B) & _M
    return c0, c1, c2, c3


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float64 uniform (2m+1)/2^24 in (0, 1), m = x >> 9."""
    return ((x >> 9).double() * 2 + 1) * 2.0**-24


def split_key(key: int) -> tuple[int, int]:
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 2**64:
        raise ValueError(f"key must be an int in [0, 2**64), got {key!r}")
    return key & _M, key >> 32


def check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**32:
        raise ValueError(f"step must be an int in [0, 2**32), got {step!r}")
    return step


def counter_uniforms(n: int, n_blocks: int, *, key: int, step: int, tag: int, offset: int = 0,
                     device="cpu") -> torch.Tensor:
    """(n, 4 * n_blocks) float64 uniforms for elements offset .. offset + n - 1."""
    k0, k1 = split_key(key)
    i = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    cols = []
    for blk in range(n_blocks):
        r = philox4x32_ref(i & _M, i >> 32, check_step(step), (tag << 24) | blk, k0, k1)
        cols += [uniform_from_bits(x) for x in r]
    return torch.stack(cols, dim=1) if cols else torch.empty(n, 0, dtype=torch.float64)


def gamma_mode(k: float) -> str:
    return {1.0: "k1", 2.0: "k2", 0.5: "k05"}.get(float(k), "mt")


def lmo_blocks(p: LMOParams, rounds: int = DEFAULT_ROUNDS) -> int:
    """Philox calls (4 uniforms each) per coordinate."""
    mode = gamma_mode(p.k)
    if mode == "mt":
        if rounds < 2 or rounds % 2:
            raise ValueError(f"rounds must be an even number >= 2, got {rounds!r}")
        return 1 + rounds // 2
    return 1 if mode == "k1" else 2


def mt_constants(k: float) -> tuple[float, float]:
    """Marsaglia-Tsang's (d, c) for shape max(k, k + 1 if k < 1)."""
    kk = k + 1.0 if k < 1 else k
    d = kk - 1.0 / 3.0
    return d, 1.0 / math.sqrt(9.0 * d)


def gamma_from_uniforms(U: torch.Tensor, k: float, rounds: int = DEFAULT_ROUNDS) -> torch.Tensor:
    """Gamma(k, 1) from the (n, 4 * blocks) uniforms of the layout above. Returns (n,)."""
    mode = gamma_mode(k)
    if mode == "k1":
        return -torch.log(U[:, 3])
    if mode == "k2":
        return -torch.log(U[:, 3]) - torch.log(U[:, 4])
    if mode == "k05":
        return -torch.log(U[:, 3]) * torch.cos(2 * math.pi * U[:, 4]) ** 2
    out, _ = marsaglia_tsang(U, k, rounds)
    if k < 1:
        out = out * torch.exp(torch.log(U[:, 3]) / k)
    return out


def marsaglia_tsang(U: torch.Tensor, k: float, rounds: int = DEFAULT_ROUNDS):
    """(Gamma(max(k, k+1 if k < 1)) draw, accepted flag) from blocks 1 .. rounds/2 of U."""
    d, c = mt_constants(k)
    out = torch.full_like(U[:, 0], d)          # fallback if every candidate is rejected
    found = torch.zeros_like(U[:, 0], dtype=torch.bool)
    for r in range(rounds // 2):
        v = U[:, 4 * (1 + r):4 * (2 + r)]
        rad = torch.sqrt(-2 * torch.log(v[:, 0]))
        for z, ua in ((rad * torch.cos(2 * math.pi * v[:, 1]), v[:, 2]),
                      (rad * torch.sin(2 * math.pi * v[:, 1]), v[:, 3])):
            t = 1 + c * z
            w = t * t * t
            ok = (t > 0) & (torch.log(ua) < 0.5 * z * z + d - d * w
                            + d * torch.log(torch.clamp(w, min=1e-30)))
            out = torch.where(ok & ~found, d * w, out)
            found = found | ok
    return out, found


def lmo_noise_from_uniforms(U: torch.Tensor, p: LMOParams,
                            rounds: int = DEFAULT_ROUNDS) -> torch.Tensor:
    """LMO-DP noise (clip norm 1) from (n, 4 * lmo_blocks(p)) uniforms in (0, 1). Returns (n,)
    in U's dtype (use float64 for the reference)."""
    need = 4 * lmo_blocks(p, rounds)
    if U.dim() != 2 or U.shape[1] < need:
        raise ValueError(f"U must have shape (n, >= {need}), got {tuple(U.shape)}")
    expo = -torch.log(U[:, 0]) / p.lam
    unif = p.a + (p.b - p.a) * U[:, 1]
    u = p.a1 * p.theta * gamma_from_uniforms(U, p.k, rounds) + p.a3 * expo + p.a4 * unif
    v = U[:, 2] - 0.5
    mag = -torch.log(1 - 2 * torch.abs(v))
    return torch.where(v < 0, -mag, mag) / u


def lmo_noise_ref(n: int, p: LMOParams, *, key: int, step: int, offset: int = 0,
                  rounds: int = DEFAULT_ROUNDS, device="cpu") -> torch.Tensor:
    """(n,) float64 LMO-DP noise (clip norm 1) for global elements offset .. offset + n - 1."""
    U = counter_uniforms(n, lmo_blocks(p, rounds), key=key, step=step, tag=TAG_LMO,
                         offset=offset, device=device)
    return lmo_noise_from_uniforms(U, p, rounds)


def gaussian_noise_ref(n: int, *, key: int, step: int, offset: int = 0, device="cpu"):
    """(n,) float64 N(0, 1) noise: Box-Muller on lanes 0, 1 of block 0 (tag 0)."""
    U = counter_uniforms(n, 1, key=key, step=step, tag=TAG_GAUSSIAN, offset=offset, device=device)
    return torch.sqrt(-2 * torch.log(U[:, 0])) * torch.cos(2 * math.pi * U[:, 1])
