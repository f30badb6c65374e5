"""Renyi-DP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of
the Sampled Gaussian Mechanism").

One step releases the clipped sum plus N(0, sigma^2) noise (sensitivity 1) on a Poisson sample of
rate q. With mu0 = N(0, sigma^2), mu1 = N(1, sigma^2) and the mixture mu = (1 - q) mu0 + q mu1, its
RDP at order alpha is log(A_alpha) / (alpha - 1), where

    A_alpha = E_{z ~ mu0} [ (mu(z) / mu0(z))^alpha ]

and mu0(z) (mu1(z) / mu0(z))^k = exp((k^2 - k) / (2 sigma^2)) * N(k, sigma^2)(z).

* Integer alpha: the binomial expansion is finite and exact. Since the binomial weights sum to 1,
      A_alpha - 1 = sum_{k=2}^{alpha} C(alpha, k) (1-q)^{alpha-k} q^k (e^{(k^2-k)/(2 sigma^2)} - 1),
  all terms positive; summed in log space and turned into log(A) with log1p, so tiny RDP values
  (large sigma) keep full relative precision.
* Fractional alpha: split the integral at z0 = sigma^2 log(1/q - 1) + 1/2, where (1-q) mu0 = q mu1,
  and expand each side in the generalized binomial series that converges there:
      A1 = sum_k C(alpha, k) (1-q)^{alpha-k} q^k     e^{(k^2-k)/(2 sigma^2)} Phi((z0 - k) / sigma)
      A2 = sum_k C(alpha, k) (1-q)^k     q^{alpha-k} e^{(j^2-j)/(2 sigma^2)} Phi((j - z0) / sigma),
  j = alpha - k. For k > alpha the coefficients alternate in sign and the terms shrink (like
  k^{-alpha-2}), so the series are summed in log space until a term is below 1e-16 of the sum
  (A >= 1, so below its rounding unit), and the first omitted term's magnitude is added (the
  remainder of an alternating series is smaller than it), which keeps A on the safe side.
* q = 1: alpha / (2 sigma^2) (the plain Gaussian); q = 0: 0.

T steps add their RDP per order; epsilon is the best conversion over the orders,
eps = rdp - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha) (Balle et al. 2020,
the rule Opacus uses). A rigorous upper bound, typically 5-10% above the tight PLD value.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special

from dpkern.accounting._base import Accountant

#: Orders 1.1 ... 10.9 (step 0.1), 11 ... 63, and 128 ... 1024 (the usual Opacus/dp_accounting set).
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])

_NEGLIGIBLE = math.log(1e-16)  # a term this far below the sum (A >= 1) is below its rounding
_MAX_TERMS = 1 << 22


def _log_abs_binom(alpha: float, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log|C(alpha, k)| and its sign, for real alpha > 1 and integer k >= 0 (gamma functions)."""
    log_abs = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    return log_abs, special.gammasgn(alpha - k + 1)


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """log(e^x - 1) for x > 0, without overflow."""
    return x + np.log(-np.expm1(-x))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha at an integer order >= 2 (exact finite sum)."""
    k = np.arange(2, alpha + 1, dtype=np.float64)
    log_c, _ = _log_abs_binom(float(alpha), k)
    log_terms = (log_c + (alpha - k) * math.log1p(-q) + k * math.log(q)
                 + _log_expm1((k * k - k) / (2 * sigma * sigma)))
    return float(np.logaddexp(0.0, special.logsumexp(log_terms)))  # log(1 + (A - 1))


def _frac_terms(q: float, sigma: float, alpha: float, z0: float, k: np.ndarray):
    """log-magnitudes of the k-th terms of A1 and A2, and the sign they share (that of C)."""
    j = alpha - k
    two_var = 2 * sigma * sigma
    log_c, sign = _log_abs_binom(alpha, k)
    log_t1 = (log_c + j * math.log1p(-q) + k * math.log(q) + (k * k - k) / two_var
              + special.log_ndtr((z0 - k) / sigma))
    log_t2 = (log_c + k * math.log1p(-q) + j * math.log(q) + (j * j - j) / two_var
              + special.log_ndtr((j - z0) / sigma))
    return log_t1, log_t2, sign


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha at a fractional order (the two series of the split integral)."""
    z0 = sigma * sigma * math.log(1 / q - 1) + 0.5
    pos, neg = [], []  # log-magnitudes of the positive and negative terms, block by block
    start, size = 0, 64
    while True:
        log_t1, log_t2, sign = _frac_terms(q, sigma, alpha, z0,
                                           np.arange(start, start + size, dtype=np.float64))
        both, signs = np.concatenate([log_t1, log_t2]), np.concatenate([sign, sign])
        pos.append(both[signs > 0])
        neg.append(both[signs < 0])
        start += size
        last = max(log_t1[-1], log_t2[-1])
        if start > alpha + 2 and last < special.logsumexp(np.concatenate(pos)) + _NEGLIGIBLE:
            break
        if start >= _MAX_TERMS:  # not reached in practice; the added term below still covers it
            break
        size *= 2
    # |first omitted term| bounds each alternating remainder: add both, on the safe side
    nxt1, nxt2, _ = _frac_terms(q, sigma, alpha, z0, np.array([float(start)]))
    pos.append(np.array([nxt1[0], nxt2[0]]))
    log_pos = special.logsumexp(np.concatenate(pos))
    log_neg = special.logsumexp(np.concatenate(neg)) if sum(map(len, neg)) else -math.inf
    return float(log_pos + math.log1p(-math.exp(min(log_neg - log_pos, 0.0))))


def rdp_subsampled_gaussian(q: float, sigma: float, order: float) -> float:
    """RDP of one step of the Poisson-subsampled Gaussian mechanism at one order > 1.

    Example: ``rdp_subsampled_gaussian(1.0, 2.0, 3)`` -> 3 / (2 * 4) = 0.375.
    """
    if q == 0.0:
        return 0.0
    if q == 1.0:
        return order / (2 * sigma * sigma)
    if float(order).is_integer():
        log_a = _log_a_int(q, sigma, int(order))
    else:
        log_a = _log_a_frac(q, sigma, float(order))
    return log_a / (order - 1)


def compute_rdp(q: float, sigma: float, steps: int, orders: Sequence[float]) -> np.ndarray:
    """RDP of ``steps`` identical steps at each order, shape [len(orders)]."""
    return steps * np.array([rdp_subsampled_gaussian(q, sigma, a) for a in orders])


def rdp_to_epsilon(orders: Sequence[float], rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(epsilon, best order) from total RDP per order (Balle et al. 2020 conversion), eps >= 0."""
    a = np.asarray(orders, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # inf RDP stays inf
        eps = np.asarray(rdp) - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    if not math.isfinite(eps[i]):
        return math.inf, math.nan
    return max(float(eps[i]), 0.0), float(a[i])


class RDPAccountant(Accountant):
    """Renyi-DP accountant: a rigorous, slightly loose upper bound on epsilon.

    Example::

        acc = RDPAccountant()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10_000)
        acc.get_epsilon(1e-5)   # 6.7128
    """

    mechanism = "rdp"

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        super().__init__()
        orders = DEFAULT_ORDERS if orders is None else tuple(float(a) for a in orders)
        if not orders or min(orders) <= 1.0:
            raise ValueError(f"orders must be a non-empty list of numbers > 1, got {orders!r}")
        self.orders = orders

    def _config(self):
        return {"orders": list(self.orders)}

    def rdp(self, groups) -> np.ndarray:
        """Total RDP at each order for these (sigma, q, count) groups, shape [len(orders)]."""
        return sum(compute_rdp(q, s, n, self.orders) for s, q, n in groups)

    def _best(self, groups, delta) -> tuple[float, float]:
        return rdp_to_epsilon(self.orders, self.rdp(groups), delta)

    def _epsilon(self, groups, delta):
        return self._best(groups, delta)[0]

    def get_epsilon_and_order(self, delta: float) -> tuple[float, float]:
        """Epsilon and the RDP order that attains it (a best order at the ends of ``orders``
        means the order range is too narrow)."""
        eps = self.get_epsilon(delta)
        groups = self._groups()
        if not groups:  # nothing spent, or a noiseless step (eps = inf): no order attains it
            return eps, float("nan")
        return eps, self._best(groups, delta)[1]
