"""Gaussian-DP accountant via the central limit theorem (Dong, Roth, Su 2022; Bu et al. 2020).

APPROXIMATE, not a bound: T subsampled-Gaussian steps are treated as mu-GDP with
mu = sqrt(sum_t q_t^2 (e^{1/sigma_t^2} - 1)), which is the CLT limit as q -> 0, T -> inf with
q*sqrt(T) fixed. At finite T it is typically optimistic (below the tight PLD value: 6.007 vs 6.188
at sigma=1, q=0.01, T=1e4, delta=1e-5). Use it for quick estimates, never for a reported guarantee.
"""
from __future__ import annotations

import math

from scipy import optimize, special

from dpkern.accounting._base import Accountant
from dpkern.accounting.prv import step_mu


def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(eps) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps * Phi(-eps/mu - mu/2), in log space."""
    a = special.log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    return math.exp(a) * -math.expm1(b - a) if b < a else 0.0


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest eps >= 0 with delta(eps) <= delta for mu-GDP (inf if mu is inf)."""
    if math.isinf(mu):
        return math.inf
    if mu == 0.0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(mu, hi) > delta:
        hi *= 2.0
    return optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12)


class GaussianAccountant(Accountant):
    """GDP/CLT accountant. APPROXIMATE: its epsilon is an estimate and may be below the truth.

    Example::

        acc = GaussianAccountant()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10_000)
        acc.get_epsilon(1e-5)   # 6.007 (approximate; tight value is 6.188)
    """

    mechanism = "gdp"
    approximate = True

    def get_mu(self) -> float:
        """The composed GDP parameter mu (0 if nothing spent, inf after a noiseless step)."""
        groups = self._groups()
        if groups is None:
            return math.inf
        return math.sqrt(sum(n * step_mu(s, q) ** 2 for s, q, n in groups))

    def _epsilon(self, groups, delta):
        return gdp_epsilon(math.sqrt(sum(n * step_mu(s, q) ** 2 for s, q, n in groups)), delta)
