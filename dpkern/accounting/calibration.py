"""Noise calibration: the smallest sigma whose epsilon does not exceed a target (never overshoots).

The search evaluates epsilon with exactly the accountant that will report it, so the returned sigma
satisfies ``accountant.get_epsilon(target_delta) <= target_epsilon`` by construction, and
``sigma - tolerance`` does not (up to the monotonicity of epsilon in sigma).
"""
from __future__ import annotations

import math

from scipy import optimize

from dpkern.accounting._base import (Accountant, check_delta, check_epsilon, check_sample_rate,
                                     check_steps)
from dpkern.accounting.edgeworth import EdgeworthAccountant, EdgeworthBoundError
from dpkern.accounting.gdp import GaussianAccountant
from dpkern.accounting.prv import PRVAccountant
from dpkern.accounting.rdp import RDPAccountant

ACCOUNTANTS: dict[str, type[Accountant]] = {
    "rdp": RDPAccountant,
    "prv": PRVAccountant,
    "pld": PRVAccountant,
    "gdp": GaussianAccountant,
    "edgeworth": EdgeworthAccountant,
}


def create_accountant(name: str, **kwargs) -> Accountant:
    """``create_accountant("prv")`` -> PRVAccountant(); names: rdp, prv (= pld), gdp, edgeworth."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {name!r}")
    return ACCOUNTANTS[name](**kwargs)


def get_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float,
                         steps: int, accountant: str = "prv", *, tolerance: float = 1e-3,
                         sigma_max: float = 1e3, **accountant_kwargs) -> float:
    """Smallest noise multiplier sigma (within ``tolerance``) with eps(sigma) <= target_epsilon.

    ``accountant="edgeworth"`` calibrates with the rigorous Edgeworth bound, never the estimate, and
    raises EdgeworthBoundError where that bound does not converge. ``"gdp"`` is approximate.

    Example::

        get_noise_multiplier(8.0, 1e-5, sample_rate=0.01, steps=10_000)                 # ~0.883
        get_noise_multiplier(8.0, 1e-5, sample_rate=0.01, steps=10_000, accountant="rdp")  # ~0.917
    """
    target_epsilon = check_epsilon(target_epsilon, "target_epsilon")
    target_delta = check_delta(target_delta, "target_delta")
    q = check_sample_rate(sample_rate)
    steps = check_steps(steps, "steps")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
    if q == 0.0 or steps == 0:
        return 0.0  # nothing is released about anyone: any sigma, even 0, spends eps = 0
    create_accountant(accountant, **accountant_kwargs)  # bad kwargs fail here, not mid-search

    memo: dict[float, float] = {}
    bound_failures: list[tuple[float, float, EdgeworthBoundError]] = []  # (e_Q, sigma, error)

    def eps(sigma: float) -> float:
        if sigma not in memo:
            acc = create_accountant(accountant, **accountant_kwargs)
            acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
            try:
                memo[sigma] = acc.get_epsilon(target_delta)
            except EdgeworthBoundError as exc:
                bound_failures.append((exc.error, sigma, exc))
                memo[sigma] = math.inf
        return memo[sigma]

    # Start from the GDP/CLT sigma (analytic, close to the tight one), then bracket geometrically:
    # eps(lo) > target >= eps(hi). Few evaluations of the (possibly slow) accountant.
    guess = 1.0
    if accountant != "gdp":
        try:
            guess = get_noise_multiplier(target_epsilon, target_delta, q, steps, "gdp",
                                         tolerance=tolerance, sigma_max=sigma_max)
        except ValueError:
            pass
    guess = min(max(guess, 2 * tolerance), sigma_max)
    factor = 1.03
    if eps(guess) > target_epsilon:
        lo, hi = guess, min(guess * factor, sigma_max)
        while eps(hi) > target_epsilon:
            if hi >= sigma_max:
                if bound_failures:
                    err, at_sigma, exc = min(bound_failures, key=lambda f: f[0])
                    raise EdgeworthBoundError(
                        "cannot calibrate with the Edgeworth accountant: calibration uses its "
                        "rigorous bound, which needs e_Q < target_delta and does not converge "
                        f"at any sigma tried ({len(bound_failures)} values up to {hi:g}); the "
                        f"smallest e_Q was {err:.4g}, at sigma={at_sigma:.4g}: " + str(exc),
                        delta=exc.delta, error=exc.error, steps=exc.steps,
                        steps_needed=exc.steps_needed) from exc
                raise ValueError(f"target_epsilon={target_epsilon} is unreachable at "
                                 f"target_delta={target_delta} with sigma <= sigma_max={sigma_max}")
            factor *= factor
            lo, hi = hi, min(hi * factor, sigma_max)
    else:
        hi, lo = guess, guess / factor
        while eps(lo) <= target_epsilon:
            if lo <= tolerance:
                return lo
            factor *= factor
            hi, lo = lo, lo / factor

    # Brent on log(eps) (close to linear in log sigma), then bisection until the bracket is tight.
    def g(log_sigma: float) -> float:
        return math.log(max(eps(math.exp(log_sigma)), 1e-300)) - math.log(target_epsilon)

    if math.isfinite(eps(lo)):
        try:
            optimize.brentq(g, math.log(lo), math.log(hi), xtol=tolerance / (4 * hi))
        except ValueError:
            pass  # non-monotone noise in eps: the bisection below still finds a valid sigma
    ok = [s for s, e in memo.items() if e <= target_epsilon]
    hi = min(ok)
    lo = max([s for s, e in memo.items() if e > target_epsilon and s < hi], default=0.0)
    while hi - lo > tolerance:
        mid = (lo + hi) / 2.0
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
