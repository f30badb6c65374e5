"""Test data: a planted low-rank signal plus i.i.d. Gaussian noise of known std (the DP release)."""
import math

import torch


def planted(b, m, n, xs, sigma, seed, dtype=torch.float64):
    """Returns (signal, noisy), both (b, m, n). Signal values are xs in noise units, i.e.
    x * sigma * sqrt(max(m, n)), with random orthonormal singular vectors."""
    g = torch.Generator().manual_seed(seed)
    r = len(xs)
    u = torch.linalg.qr(torch.randn(b, m, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(b, n, r, generator=g, dtype=torch.float64))[0]
    vals = torch.tensor(xs, dtype=torch.float64) * sigma * math.sqrt(max(m, n))
    signal = (u * vals) @ v.mT
    noisy = signal + sigma * torch.randn(b, m, n, generator=g, dtype=torch.float64)
    return signal.to(dtype), noisy.to(dtype)


def _orth(x):
    return torch.linalg.qr(x)[0]


def drifting(steps, shapes, xs, sigma, seed, delta=0.05, abrupt_at=(), appear_at=None):
    """A sequence of `steps` (signal, noisy) pairs of {name: (m, n) float32} dicts: a planted
    signal with values xs (noise units) whose singular vectors drift by ~delta radians a step,
    fresh noise each step (a DP release per step). At each step in abrupt_at both subspaces are
    replaced by new random ones; with appear_at, the signal is 0 before that step."""
    g = torch.Generator().manual_seed(seed)
    r = len(xs)
    uv = {k: (_orth(torch.randn(m, r, generator=g, dtype=torch.float64)),
              _orth(torch.randn(n, r, generator=g, dtype=torch.float64)))
          for k, (m, n) in shapes.items()}
    out = []
    for t in range(steps):
        for k, (u, v) in uv.items():
            if t in abrupt_at:
                u = _orth(torch.randn(u.shape, generator=g, dtype=u.dtype))
                v = _orth(torch.randn(v.shape, generator=g, dtype=v.dtype))
            elif t:                      # each column moves by ~delta (radians)
                u, v = (_orth(x + delta * torch.randn(x.shape, generator=g, dtype=x.dtype)
                              / math.sqrt(x.shape[0])) for x in (u, v))
            uv[k] = (u, v)
        signal, noisy = {}, {}
        for k, (m, n) in shapes.items():
            u, v = uv[k]
            on = appear_at is None or t >= appear_at
            vals = torch.tensor(xs, dtype=torch.float64) * sigma * math.sqrt(max(m, n)) * on
            signal[k] = ((u * vals) @ v.mT).float()
            noise = sigma * torch.randn(m, n, generator=g, dtype=torch.float64)
            noisy[k] = (signal[k].double() + noise).float()
        out.append((signal, noisy))
    return out
