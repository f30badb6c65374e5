"""Singular-value shrinkers for a matrix observed in i.i.d. Gaussian noise (the DP-SGD release).

Model: G~ = G + sigma_e * Z, G~ and G are (m, n), Z has i.i.d. N(0, 1) entries, sigma_e is known
exactly (sigma * C / B_expected). Write N = max(m, n), beta = min(m, n) / N, and measure a singular
value s in noise units y = s / (sigma_e * sqrt(N)). Pure noise fills the bulk y <= 1 + sqrt(beta),
i.e. s <= sigma_e * (sqrt(m) + sqrt(n)) (the "bulk edge"). A signal singular value x (same units)
above beta^(1/4) shows up as an outlier y(x) = sqrt((1 + x^2)(beta + x^2)) / x (Benaych-Georges &
Nadakuditi 2012); the inverse map is x(y)^2 = (y^2 - beta - 1 + sqrt((y^2 - beta - 1)^2 - 4 beta)) / 2.

Every function here works on singular values alone (the math is in README.md next to this file);
all of them return 0 at and below the threshold kappa * edge, so a pure-noise matrix is zeroed.
"""
from __future__ import annotations

import math

import torch

SHRINKERS = ("frobenius", "operator", "nuclear", "hard")


def _check_dims(m: int, n: int) -> tuple[int, int]:
    for name, v in (("m", m), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return min(m, n), max(m, n)


def _check_sigma(sigma: float, name: str = "sigma") -> float:
    s = float(sigma)
    if not (math.isfinite(s) and s > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {sigma!r}")
    return s


def _check_kappa(kappa: float) -> float:
    k = float(kappa)
    if not (math.isfinite(k) and k > 0.0):
        raise ValueError(f"kappa must be finite and > 0, got {kappa!r}")
    return k


def bulk_edge(m: int, n: int, sigma: float) -> float:
    """Largest singular value of the noise alone, asymptotically: sigma * (sqrt(m) + sqrt(n))."""
    _check_dims(m, n)
    return _check_sigma(sigma) * (math.sqrt(m) + math.sqrt(n))


def kappa_for_false_positive_rate(m: int, n: int, p: float) -> float:
    """kappa such that P(largest noise singular value > kappa * edge) <= p, for any m, n.

    From the Gaussian concentration bound P(||Z||_op >= sqrt(m) + sqrt(n) + t) <= exp(-t^2 / 2)
    (Davidson & Szarek 2001): kappa = 1 + sqrt(2 ln(1/p)) / (sqrt(m) + sqrt(n)). The bound is rigorous
    but loose; at kappa = 1 the largest noise value lands above the edge with probability ~0.1-0.2
    (Tracy-Widom fluctuations of size ~N^(-1/6)), where the continuous shrinkers keep only a sliver.
    """
    _check_dims(m, n)
    if not 0.0 < float(p) < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    return 1.0 + math.sqrt(2.0 * math.log(1.0 / p)) / (math.sqrt(m) + math.sqrt(n))


def _y_units(s: torch.Tensor, sigma: float, big: int) -> torch.Tensor:
    return s.double() / (sigma * math.sqrt(big))


def _sqrt(x):
    return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)


def _signal_x(y: torch.Tensor, beta) -> torch.Tensor:
    """Inverse outlier map x(y) in noise units; 0 inside the bulk."""
    a = y * y - beta - 1.0
    disc = (a * a - 4.0 * beta).clamp_min(0.0)
    x2 = 0.5 * (a + disc.sqrt())
    return torch.where(y > 1.0 + _sqrt(beta), x2.clamp_min(0.0).sqrt(), torch.zeros_like(y))


def shrink_noise_units(y: torch.Tensor, beta, kind: str) -> torch.Tensor:
    """The shrinkers in noise units (no threshold applied): eta(y) for aspect ratio beta <= 1
    (a float, or a float64 tensor broadcasting against y: one ratio per row of a stack)."""
    if kind == "hard":
        return y
    if kind == "frobenius":
        a = y * y - beta - 1.0
        return (a * a - 4.0 * beta).clamp_min(0.0).sqrt() / y.clamp_min(1e-300)
    x = _signal_x(y, beta)
    if kind == "operator":
        return x
    if kind == "nuclear":
        x2 = x * x
        num = x2 * x2 - beta - _sqrt(beta) * x * y
        return (num / (x2 * y).clamp_min(1e-300)).clamp_min(0.0)
    raise ValueError(f"kind must be one of {SHRINKERS}, got {kind!r}")


def shrink(s: torch.Tensor, sigma: float, m: int, n: int, kind: str = "frobenius",
           kappa: float = 1.0) -> torch.Tensor:
    """eta(s): shrunk singular values of an (m, n) matrix seen in noise of std sigma per entry.

    Args:
        s: singular values, any shape (e.g. (k,) or (b, k)), float. Non-negative.
        sigma: noise std per entry (> 0).
        m, n: the matrix shape (either order).
        kind: "frobenius" (Frobenius-optimal, sqrt((y^2-beta-1)^2-4beta)/y in noise units),
            "operator" (x(y): the signal-value estimate theta-hat, optimal for operator-norm loss),
            "nuclear" ((x^4 - beta - sqrt(beta) x y)_+ / (x^2 y)), or "hard" (keep s as is).
        kappa: threshold multiplier; values s <= kappa * sigma * (sqrt(m) + sqrt(n)) become 0.
    Returns:
        tensor of s's shape and dtype.

    Example:
        >>> shrink(torch.tensor([3.0, 1.0]), 1.0, 1, 1)   # beta = 1, edge = 2
        tensor([2.2361, 0.0000])
    """
    if kind not in SHRINKERS:
        raise ValueError(f"kind must be one of {SHRINKERS}, got {kind!r}")
    small, big = _check_dims(m, n)
    sigma = _check_sigma(sigma)
    kappa = _check_kappa(kappa)
    beta = small / big
    y = _y_units(s, sigma, big)
    eta_y = shrink_noise_units(y, beta, kind)
    keep = y > kappa * (1.0 + math.sqrt(beta))
    eta = torch.where(keep, eta_y, torch.zeros_like(eta_y)) * (sigma * math.sqrt(big))
    return eta.to(s.dtype)


def shrink_rows(s: torch.Tensor, sigma: float, dims: torch.Tensor, kind: str = "frobenius",
                kappa: float = 1.0) -> torch.Tensor:
    """`shrink` of a (b, w) stack whose rows belong to matrices of different shapes, in one set
    of launches: row i as shrink(s[i], sigma, small_i, big_i, kind, kappa).

    dims: (b, 2) float64 on s's device, row i = (small_i / big_i, sqrt(big_i)) (`shrink_dims`).
    The same formulas as `shrink`, with the per-row constants as tensors (same roundings).
    """
    if kind not in SHRINKERS:
        raise ValueError(f"kind must be one of {SHRINKERS}, got {kind!r}")
    sigma = _check_sigma(sigma)
    kappa = _check_kappa(kappa)
    beta, scale = dims[:, :1], dims[:, 1:] * sigma           # (b, 1): beta, sigma sqrt(big)
    y = s.double() / scale
    eta_y = shrink_noise_units(y, beta, kind)
    keep = y > kappa * (1.0 + beta.sqrt())
    eta = torch.where(keep, eta_y, torch.zeros_like(eta_y)) * scale
    return eta.to(s.dtype)


def shrink_dims(m: int, n: int) -> tuple[float, float]:
    """(beta, sqrt(big)) of an (m, n) matrix: a row of shrink_rows' `dims`."""
    small, big = _check_dims(m, n)
    return small / big, math.sqrt(big)


def signal_estimate(s: torch.Tensor, sigma: float, m: int, n: int, kappa: float = 1.0) -> torch.Tensor:
    """theta-hat: the plain estimate of the signal singular value behind an observed one (s units).

    theta^2 = (s^2 - sigma^2 (m + n) + sqrt((s^2 - sigma^2 (m + n))^2 - 4 sigma^4 m n)) / 2 above
    kappa * edge, else 0. Written in s units on purpose: it must equal shrink(kind="operator").
    """
    _check_dims(m, n)
    sigma = _check_sigma(sigma)
    kappa = _check_kappa(kappa)
    s2 = s.double() ** 2
    a = s2 - sigma**2 * (m + n)
    disc = (a * a - 4.0 * sigma**4 * m * n).clamp_min(0.0)
    theta = (0.5 * (a + disc.sqrt())).clamp_min(0.0).sqrt()
    keep = s.double() > kappa * sigma * (math.sqrt(m) + math.sqrt(n))
    return torch.where(keep, theta, torch.zeros_like(theta)).to(s.dtype)


# Asymptotic predictions (Benaych-Georges & Nadakuditi 2012; Gavish & Donoho 2017), in noise units.

def outlier_location(x: float, beta: float) -> float:
    """Where a signal value x shows up in the noisy spectrum: y(x) (the edge if x <= beta^(1/4))."""
    if x <= beta**0.25:
        return 1.0 + math.sqrt(beta)
    return math.sqrt((1.0 + x * x) * (beta + x * x)) / x


def outlier_cosines(x: float, beta: float) -> tuple[float, float]:
    """|<u, u~>|, |<v, v~>|: overlaps of the signal's left/right vectors with the noisy ones.

    Left = the min(m, n) side. Both are 0 at or below the detection threshold x = beta^(1/4).
    """
    x4 = x**4
    if x4 <= beta:
        return 0.0, 0.0
    return math.sqrt((x4 - beta) / (x4 + beta * x * x)), math.sqrt((x4 - beta) / (x4 + x * x))


def predicted_loss(xs, beta: float, kind: str = "frobenius") -> float:
    """Asymptotic ||G-hat - G||_F^2 / (sigma^2 N) for a signal with values xs (noise units).

    Each component contributes eta^2 + x^2 - 2 eta x c c~ (components decouple asymptotically);
    components at or below the threshold are lost (contribute x^2). kappa = 1.
    """
    total = 0.0
    for x in xs:
        y = outlier_location(x, beta)
        c, ct = outlier_cosines(x, beta)
        eta = 0.0
        if x > beta**0.25:
            eta = float(shrink_noise_units(torch.tensor([y], dtype=torch.float64), beta, kind))
        total += eta * eta + x * x - 2.0 * eta * x * c * ct
    return total
