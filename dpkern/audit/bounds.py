"""Lower bounds on epsilon from a one-run membership game (the audit statistics).

The game: m canaries, each included in training with a secret fair coin. After training the
auditor guesses "in" or "out" for r of them (abstaining on the rest) and gets v right. A mechanism
that is private cannot let the auditor do much better than a coin; how much better it may do is
what the tests below bound. Each function answers "at confidence 1 - beta, the mechanism is NOT
(eps, delta)-DP for any eps below the returned value".

* ``epsilon_lower_bound``: Steinke, Nasr, Jagielski (2023), "Privacy auditing with one (1)
  training run", Thm. 5.2: if M is (eps, delta)-DP then for every v
      P[W >= v] <= P[Bin(r, q_eps) >= v] + 2 m delta * max_{1<=i<=v} P[v-i <= Bin(r, q_eps) < v] / i,
  q_eps = e^eps / (1 + e^eps).
* ``fdp_rejects`` / ``epsilon_lower_bound_fdp`` / ``mu_lower_bound``: Mahloujifar, Melis,
  Chaudhuri (2024), "Auditing f-differential privacy in one run": the same game tested against a
  whole trade-off curve f, which is tighter. The curve enters only through ``min_fpr(tpr)``: the
  smallest false-positive rate a test of "in vs out" can have at a given true-positive rate.
  Two families are provided: (eps, delta)-DP itself (a rigorous eps lower bound, comparable to the
  accountant's eps) and mu-GDP (the tightest, for mechanisms whose curve is Gaussian).

All functions are plain float/NumPy code (no torch) and cheap: m = 10^5 takes milliseconds.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import special, stats

from dpkern.accounting.gdp import gdp_epsilon

MinFpr = Callable[[float], float]


def _check_counts(m: int, r: int, v: int) -> tuple[int, int, int]:
    for name, x in (("m", m), ("r", r), ("v", v)):
        if isinstance(x, bool) or not float(x).is_integer():
            raise ValueError(f"{name} must be a whole number, got {x!r}")
    m, r, v = int(m), int(r), int(v)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v (correct) <= r (guesses) <= m (canaries), got v={v}, r={r}, "
                         f"m={m}")
    return m, r, v


def _check_prob(x: float, name: str, lo_open: bool = True) -> float:
    x = float(x)
    ok = (0.0 < x < 1.0) if lo_open else (0.0 <= x < 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'(0' if lo_open else '[0'}, 1), got {x!r}")
    return x


def p_value_approx_dp(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses right] allowed by (epsilon, delta)-DP (Steinke et al. Thm 5.2).

    Example: ``p_value_approx_dp(1000, 100, 100, 3.0, 0.0) == (e^3/(1+e^3))**100``.
    """
    m, r, v = _check_counts(m, r, v)
    delta = _check_prob(delta, "delta", lo_open=False)
    if epsilon < 0 or math.isnan(epsilon):
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if v == 0:
        return 1.0
    q = special.expit(epsilon)
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Bin >= v]
    if delta == 0.0:
        return min(tail, 1.0)
    # P[v-i <= Bin < v] for i = 1..v, as differences of the cdf.
    i = np.arange(1, v + 1)
    below_v = stats.binom.cdf(v - 1, r, q)
    window = below_v - stats.binom.cdf(v - 1 - i, r, q)
    worst = float(np.max(window / i))
    return min(tail + 2.0 * m * delta * worst, 1.0)


def _largest_rejected(rejects: Callable[[float], bool], hi: float = 1.0, tol: float = 1e-6) -> float:
    """sup{x >= 0 : rejects(x)} for a predicate that is true on [0, x*) and false above.

    Returns the lower end of the final bracket, a value at which the claim is still rejected (or 0),
    so the bound is never rounded up.
    """
    if not rejects(0.0):
        return 0.0
    lo = 0.0
    while rejects(hi):
        lo, hi = hi, hi * 2.0
        if hi > 1e4:
            return math.inf  # rejected for every finite parameter: no privacy at all
    while hi - lo > tol * max(1.0, lo):
        mid = 0.5 * (lo + hi)
        if rejects(mid):
            lo = mid
        else:
            hi = mid
    return lo


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """Largest eps such that (eps, delta)-DP is rejected at confidence 1 - beta (Steinke et al.).

    Args:
        m: number of canaries (each included with probability 1/2).
        r: number of guesses made (abstentions excluded); v: number of correct guesses.
        delta: the delta of the claim being tested; beta: allowed probability of a wrong bound.
    Example: ``epsilon_lower_bound(1000, 100, 100, 0.0, 0.05)`` is about 3.49.
    """
    m, r, v = _check_counts(m, r, v)
    beta = _check_prob(beta, "beta")
    return _largest_rejected(lambda e: p_value_approx_dp(m, r, v, e, delta) < beta)


# --- f-DP (Mahloujifar et al.) ------------------------------------------------------------------

def gdp_min_fpr(mu: float) -> MinFpr:
    """mu-GDP: a test with true-positive rate t has false-positive rate >= Phi(Phi^-1(t) - mu)."""
    return lambda t: float(special.ndtr(special.ndtri(t) - mu))


def approx_dp_min_fpr(epsilon: float, delta: float) -> MinFpr:
    """(eps, delta)-DP: FPR >= max(0, (t - delta) e^-eps, 1 - delta - e^eps (1 - t))."""
    e_neg, e_pos = math.exp(-epsilon), math.exp(min(epsilon, 700.0))
    return lambda t: max(0.0, (t - delta) * e_neg, 1.0 - delta - e_pos * (1.0 - t))


def fdp_rejects(m: int, r: int, v: int, min_fpr: MinFpr, beta: float = 0.05) -> bool:
    """True when "v of r guesses right" has probability < beta under every f-DP mechanism.

    The bound of Mahloujifar et al. (2024), computed by their recursion over the number of correct
    guesses: start from the mass that v correct guesses at probability beta forces, and push it down
    one correct guess at a time, each time requiring that the mass on correct guesses (tpr-like) and
    on wrong guesses (fpr-like) respect the trade-off curve. If the mass needed exceeds the r/m
    available, no f-DP mechanism can produce the observation with probability beta.
    """
    m, r, v = _check_counts(m, r, v)
    beta = _check_prob(beta, "beta")
    if v == 0:
        return False
    right = beta * v / m           # mass on correct guesses
    wrong = beta * (r - v) / m     # mass on wrong guesses
    for i in range(v - 1, -1, -1):
        wrong_new = max(wrong, min_fpr(right))
        if wrong_new == wrong:     # a fixed point: nothing changes any more
            break
        right = min(right + i / (r - i) * (wrong_new - wrong), 1.0)
        wrong = wrong_new
    return right + wrong > r / m


def mu_lower_bound(m: int, r: int, v: int, beta: float = 0.05) -> float:
    """Largest mu such that mu-GDP is rejected at confidence 1 - beta (f-DP audit, GDP family)."""
    m, r, v = _check_counts(m, r, v)
    return _largest_rejected(lambda mu: fdp_rejects(m, r, v, gdp_min_fpr(mu), beta))


def epsilon_lower_bound_fdp(m: int, r: int, v: int, delta: float, beta: float = 0.05,
                            family: str = "approx_dp") -> float:
    """eps lower bound at delta from the f-DP audit.

    family="approx_dp": the largest eps whose (eps, delta)-DP curve is rejected: a rigorous eps lower
    bound, comparable to any accountant's eps. family="gdp": eps(delta) of mu_lower_bound, i.e. a lower
    bound under the hypothesis that the mechanism's curve is Gaussian-shaped (tighter, not general).
    """
    m, r, v = _check_counts(m, r, v)
    delta = _check_prob(delta, "delta")
    if family == "approx_dp":
        return _largest_rejected(lambda e: fdp_rejects(m, r, v, approx_dp_min_fpr(e, delta), beta))
    if family == "gdp":
        return gdp_epsilon(mu_lower_bound(m, r, v, beta), delta)
    raise ValueError(f"family must be 'approx_dp' or 'gdp', got {family!r}")
