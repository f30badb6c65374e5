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
