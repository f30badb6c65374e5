"""Plain-PyTorch ground truth: Philox4x32-10 in int64 ops, Box–Muller, and the noisy optimizer step.

Slow and obviously correct; the same uniforms (bit for bit) and z (to float rounding) as the Triton
and CUDA kernels. Counter layout: kernels/philox.py and dpkern/noise/README.md.
"""
from __future__ import annotations

import math

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF
STREAM_GAUSSIAN = 0  # stream tag of the optimizer's Gaussian noise
MAX_STEP = 1 << 56


def _mulhilo(m: int, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m * a for a constant m < 2**32 and a in [0, 2**32), int64 only.

    m = mh * 2**16 + ml, so m*a = (a*mh >> 16) * 2**32 + [((a*mh) & 0xFFFF) << 16 + a*ml]; every
    partial product stays below 2**49.
    """
    mh, ml = m >> 16, m & 0xFFFF
    p_h = a * mh
    p_l = a * ml
    s = ((p_h & 0xFFFF) << 16) + p_l
    return (p_h >> 16) + (s >> 32), s & _MASK


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values; returns four int64 tensors in [0, 2**32)."""
    for r in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def key_words(key: bytes) -> tuple[int, int, int, int]:
    """The 16 secret bytes as four little-endian uint32 words (s0, s1, s2, s3)."""
    if len(key) != 16:
        raise ValueError(f"key must be 16 bytes, got {len(key)}")
    return tuple(int.from_bytes(key[4 * i:4 * i + 4], "little") for i in range(4))


def step_words(step: int, stream: int = STREAM_GAUSSIAN) -> tuple[int, int]:
    """(step_lo, step_hi_stream): counter words c2, c3 before whitening."""
    if not 0 <= step < MAX_STEP:
        raise ValueError(f"step must be in [0, 2**56), got {step}")
    if not 0 <= stream < 256:
        raise ValueError(f"stream must be in [0, 256), got {stream}")
    return step & _MASK, (stream << 24) | (step >> 32)


def _u32(x: int) -> int:
    return x & _MASK


def philox_words(g: torch.Tensor, words: dict):
    """The 4 uint32 outputs (as int64 tensors) for group indices g (int64 tensor).

    words: {'k0', 'k1', 'c2', 'c3'} as given by NoiseGenerator.kernel_words(step) (int32 bit patterns).
    """
    g = g.to(torch.int64)
    c0, c1 = g & _MASK, (g >> 32) & _MASK
    c2 = torch.full_like(g, _u32(words["c2"]))
    c3 = torch.full_like(g, _u32(words["c3"]))
    return philox4x32_10(c0, c1, c2, c3, _u32(words["k0"]), _u32(words["k1"]))


def uniforms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint32 words (int64 tensor) -> (u_r in (0, 1], u_a in [0, 1]) as float32, exactly as the kernels."""
    xf = x.to(torch.float32)
    scaled = xf * 2.0**-32  # exact: a power-of-two scaling of a float32
    return scaled + 2.0**-33, scaled


def normals(e: torch.Tensor, words: dict) -> torch.Tensor:
    """z (float32) for global element indices e (int64 tensor, any shape) under `words`."""
    x0, x1, x2, x3 = philox_words(e >> 2, words)
    lane = e & 3
    r, t = _polar(torch.where(lane < 2, x0, x2), torch.where(lane < 2, x1, x3))
    return torch.where((lane & 1) == 0, r * torch.cos(t), r * torch.sin(t))


def _polar(xr: torch.Tensor, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box–Muller radius and angle (float32) from the words of u_r and u_a."""
    u_r, _ = uniforms(xr)
    _, u_a = uniforms(xa)
    return torch.sqrt(-2.0 * torch.log(u_r)), u_a * torch.tensor(2 * math.pi, dtype=torch.float32)


# Elements per pass of tensor_normals: the int64 temporaries of a pass stay in cache on a CPU.
RANGE_CHUNK = 1 << 16


def tensor_normals(numel: int, global_offset: int, words: dict, device="cpu") -> torch.Tensor:
    """z for the elements global_offset .. global_offset + numel - 1: float32 (numel,).

    The same values as normals(arange(...)), bit for bit, at a quarter of its Philox work: a
    contiguous range runs each counter group once and takes all four of its lanes, in passes of
    RANGE_CHUNK elements."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for s in range(0, numel, RANGE_CHUNK):
        n = min(RANGE_CHUNK, numel - s)
        out[s:s + n] = _range_normals(global_offset + s, n, words, out.device)
    return out


def _range_normals(first: int, n: int, words: dict, device) -> torch.Tensor:
    g0 = first >> 2
    g = torch.arange(g0, ((first + n - 1) >> 2) + 1, dtype=torch.int64, device=device)
    x0, x1, x2, x3 = philox_words(g, words)
    lanes = []
    for xr, xa in ((x0, x1), (x2, x3)):  # lanes 0, 1 from (x0, x1); lanes 2, 3 from (x2, x3)
        r, t = _polar(xr, xa)
        lanes += [r * torch.cos(t), r * torch.sin(t)]
    z = torch.stack(lanes, dim=1).reshape(-1)
    return z[first - 4 * g0: first - 4 * g0 + n]


def noisy_grad_ref(g: torch.Tensor, z: torch.Tensor | None, *, noise_std: float,
                   inv_b: float) -> torch.Tensor:
    """(g + noise_std * z) * inv_b in g's dtype; with noise_std == 0 z is not read (may be None):
    g * inv_b, as the kernels, which then draw no z."""
    if noise_std == 0:
        return g * inv_b
    return (g + noise_std * z) * inv_b


def noisy_update_ref(p: torch.Tensor, g: torch.Tensor, z: torch.Tensor | None, m: torch.Tensor | None,
                     v: torch.Tensor | None, *, optimizer: str, hyper: dict, noise_std: float,
                     inv_b: float, compute_dtype=torch.float32):
    """One element-wise update on flat tensors, in `compute_dtype`; returns (p, m, v) new values.

    g_noisy = noisy_grad_ref(g, z), then SGD (coupled weight decay, momentum with dampening,
    Nesterov; `first` initialises the buffer with the gradient as torch.optim.SGD does) or AdamW
    (decoupled decay, bias corrections for step `t`), as written in torch.optim.
    """
    c = compute_dtype
    pf = p.to(c)
    gn = noisy_grad_ref(g.to(c), None if z is None else z.to(c), noise_std=noise_std, inv_b=inv_b)
    lr, wd = hyper["lr"], hyper.get("weight_decay", 0.0)
    if optimizer == "sgd":
        d = gn + wd * pf if wd != 0 else gn
        mu = hyper.get("momentum", 0.0)
        m_new = None
        if mu != 0:
            mf = m.to(c)
            m_new = d.clone() if hyper.get("first", False) else mu * mf + (1 - hyper.get("dampening", 0.0)) * d
            d = d + mu * m_new if hyper.get("nesterov", False) else m_new
        return pf - lr * d, m_new, None
    if optimizer == "adamw":
        b1, b2, eps, t = hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["step"]
        pf = pf * (1 - lr * wd)
        m_new = b1 * m.to(c) + (1 - b1) * gn
        v_new = b2 * v.to(c) + (1 - b2) * gn * gn
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        denom = torch.sqrt(v_new) / math.sqrt(bc2) + eps
        return pf - (lr / bc1) * m_new / denom, m_new, v_new
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
