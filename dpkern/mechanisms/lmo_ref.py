"""Plain-PyTorch ground truth for the LMO-DP sampler (float64, slow, obviously correct).

Counter layout: dpkern.noise's (kernels/philox.py, dpkern/noise/README.md) on stream 1. Host side,
``words = NoiseGenerator.kernel_words(step, stream=STREAM_LMO)`` gives the Philox key and the
whitened step words; coordinate e (global index) takes Philox calls X = e * B + j, j = 0 .. B - 1,
B = lmo_blocks(params) (Gaussian noise on stream 0 packs 4 elements per call; LMO needs >= 4
uniforms per element). Each word x maps to the OPEN-interval uniform (2m+1) / 2^24, m = x >> 9
(exact in fp32, never 0 or 1, symmetric about 1/2: the Laplace and log transforms need both ends
open, which dpkern.noise's radius/angle uniforms are not).

LMO-DP per coordinate (uniforms U[:, 4j + lane]):
  U0: Exp(rate lam) = -log(U0)/lam,  U1: Uniform(a, b) = a + (b - a) U1,  U2: Laplace sign/magnitude,
  Gamma(k, theta) by gamma_mode(k):
    "k1"  (k = 1):   -log(U3)                       1 call
    "k2"  (k = 2):   -log(U3) - log(U4)             2 calls
    "k05" (k = 0.5): -log(U3) cos^2(2 pi U4)   (= Z^2/2, Box-Muller)    2 calls
    "mt"  (other k): Marsaglia-Tsang, `rounds` candidates, branch-free (first accepted wins;
                     if none is, the value d; probability < 0.005^(rounds/2), see README.md);
                     k < 1 uses Gamma(k+1) * U3^(1/k). Call 1 + r feeds candidates 2r and 2r+1:
                     Box-Muller normals from its lanes 0, 1 and acceptance uniforms from lanes 2, 3.
  u = a1 theta Gamma + a3 Exp + a4 Uniform;  noise = sign(U2 - 1/2) * (-log(1 - 2|U2 - 1/2|)) / u.
"""
from __future__ import annotations

import math

import torch

from dpkern.mechanisms.lmo_params import LMOParams
from dpkern.noise.reference import normals, philox_words

STREAM_LMO = 1
DEFAULT_ROUNDS = 8
_WORD_KEYS = ("k0", "k1", "c2", "c3")


def check_words(words) -> dict:
    """words = NoiseGenerator.kernel_words(step, stream=...): four int32 bit patterns."""
    if not isinstance(words, dict) or set(words) != set(_WORD_KEYS):
        raise ValueError("words must be the dict NoiseGenerator.kernel_words(step, stream=...) "
                         f"returns (keys {_WORD_KEYS}), got {words!r}")
    for k in _WORD_KEYS:
        v = words[k]
        if isinstance(v, bool) or not isinstance(v, int) or not -2**31 <= v < 2**31:
            raise ValueError(f"words[{k!r}] must be an int32 bit pattern, got {v!r}")
    return words


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float64 uniform (2m+1)/2^24 in (0, 1), m = x >> 9."""
    return ((x >> 9).double() * 2 + 1) * 2.0**-24


def counter_uniforms(n: int, n_blocks: int, words: dict, offset: int = 0,
                     device="cpu") -> torch.Tensor:
    """(n, 4 * n_blocks) float64 uniforms for global elements offset .. offset + n - 1."""
    check_words(words)
    e = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    cols = []
    for blk in range(n_blocks):
        cols += [uniform_from_bits(x) for x in philox_words(e * n_blocks + blk, words)]
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


# Gamma path codes: the kernels' GAMMA_MODE (kernels/lmo_noise.py), csrc's DpkGammaMode.
GAMMA_CODES = {"k1": 0, "k2": 1, "k05": 2, "mt": 3}


def kernel_constants(p: LMOParams, rounds: int = DEFAULT_ROUNDS) -> dict:
    """The sampler's constants as every kernel takes them (the fields of csrc's DpkLmoNoise;
    kernels/lmo_noise.lmo_kernel_args maps them to Triton's arguments). Validates rounds."""
    n_blocks = lmo_blocks(p, rounds)
    d, c = mt_constants(p.k)
    return dict(a1_theta=p.a1 * p.theta, a3_over_lam=p.a3 / p.lam, a4=p.a4, unif_a=p.a,
                unif_w=p.b - p.a, mt_d=d, mt_c=c, inv_k=1.0 / p.k,
                gamma_mode=GAMMA_CODES[gamma_mode(p.k)], rounds=int(rounds), boost=p.k < 1,
                n_blocks=n_blocks)


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


def lmo_noise_ref(n: int, p: LMOParams, *, words: dict, offset: int = 0,
                  rounds: int = DEFAULT_ROUNDS, device="cpu") -> torch.Tensor:
    """(n,) float64 LMO-DP noise (clip norm 1) for global elements offset .. offset + n - 1."""
    U = counter_uniforms(n, lmo_blocks(p, rounds), words, offset, device)
    return lmo_noise_from_uniforms(U, p, rounds)


def gaussian_noise_ref(n: int, *, words: dict, offset: int = 0, device="cpu") -> torch.Tensor:
    """(n,) float64 N(0, 1): dpkern.noise's normals (stream 0 words) for the same elements."""
    e = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    return normals(e, check_words(words)).double()
