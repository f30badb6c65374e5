"""The audit statistics: known values, validity by simulation (never above the true eps), tightness.

Validity is tested where the truth is known exactly: randomized response (pure eps-DP) and the
Gaussian mechanism on isolated coordinates (mu-GDP, eps(delta) in closed form). All randomness is
from fixed NumPy seeds, so the tests are deterministic.
"""
import math

import numpy as np
import pytest
from scipy import special

from dpkern.accounting.gdp import gdp_epsilon
from dpkern.audit import bounds


def closed_form_all_right(r: int, beta: float) -> float:
    """r of r right, delta = 0: reject eps while q_eps^r < beta, so eps* = logit(beta^(1/r))."""
    q = beta ** (1.0 / r)
    return math.log(q / (1.0 - q))


@pytest.mark.parametrize("r", [1, 4, 5, 10, 100, 1000])
def test_all_correct_matches_closed_form(r):
    # r <= 4: 0.05^(1/r) <= 1/2, so even eps = 0 cannot be rejected and the bound is 0
    expected = max(0.0, closed_form_all_right(r, 0.05))
    assert bounds.epsilon_lower_bound(2 * r, r, r, 0.0, 0.05) == pytest.approx(expected, abs=1e-5)
    assert bounds.epsilon_lower_bound(2 * r, r, r, 0.0, 0.05) <= expected  # never rounded up


def test_p_value_known_values():
    # delta = 0: plain binomial tail
    q = special.expit(1.0)
    assert bounds.p_value_approx_dp(100, 10, 10, 1.0, 0.0) == pytest.approx(q ** 10, rel=1e-12)
    assert bounds.p_value_approx_dp(100, 10, 0, 1.0, 0.0) == 1.0
    # delta term: v = r = 1 -> P[Bin(1,q) >= 1] + 2 m delta P[Bin(1,q) = 0] / 1
    assert bounds.p_value_approx_dp(50, 1, 1, 0.5, 1e-4) == pytest.approx(
        special.expit(0.5) + 2 * 50 * 1e-4 * (1 - special.expit(0.5)), rel=1e-12)


def test_delta_and_counts_monotone():
    m, r = 10_000, 1000
    e0 = bounds.epsilon_lower_bound(m, r, 900, 0.0)
    e5 = bounds.epsilon_lower_bound(m, r, 900, 1e-5)
    e4 = bounds.epsilon_lower_bound(m, r, 900, 1e-4)
    assert e0 > e5 > e4 > 0  # a larger delta claims less, so less can be refuted
    vs = [bounds.epsilon_lower_bound(m, r, v, 1e-5) for v in (500, 600, 800, 950, 1000)]
    assert vs[0] == 0.0 and all(a < b for a, b in zip(vs, vs[1:]))
    assert bounds.epsilon_lower_bound(m, r, 1000, 1e-5, beta=0.01) < vs[-1]  # more confidence


def test_fdp_at_least_as_tight_and_consistent():
    m, r, v = 10_000, 600, 590
    e_dp = bounds.epsilon_lower_bound(m, r, v, 1e-5)
    e_fdp = bounds.epsilon_lower_bound_fdp(m, r, v, 1e-5, family="approx_dp")
    assert e_fdp >= e_dp - 1e-3
    mu = bounds.mu_lower_bound(m, r, v)
    assert bounds.fdp_rejects(m, r, v, bounds.gdp_min_fpr(mu * 0.99))
    assert not bounds.fdp_rejects(m, r, v, bounds.gdp_min_fpr(mu * 1.01 + 1e-3))
    assert bounds.epsilon_lower_bound_fdp(m, r, v, 1e-5, family="gdp") == pytest.approx(
        gdp_epsilon(mu, 1e-5))


def test_min_fpr_curves():
    f = bounds.approx_dp_min_fpr(1.0, 0.0)
    assert f(0.5) == pytest.approx(0.5 / math.e)
    assert f(1.0) == pytest.approx(1 - 0.0)  # full power forces full FPR when delta = 0
    g = bounds.gdp_min_fpr(0.0)
    assert g(0.3) == pytest.approx(0.3)  # mu = 0: no test beats a coin


def _gaussian_game(rng, m, mu, k):
    s = rng.integers(0, 2, m).astype(bool)
    y = s * mu + rng.standard_normal(m)
    o = np.argsort(-y, kind="stable")
    v = int(s[o[:k]].sum() + (~s[o[m - k:]]).sum())
    return 2 * k, v


def _rr_game(rng, m, eps):
    s = rng.integers(0, 2, m).astype(bool)
    right = rng.random(m) < special.expit(eps)
    return m, int(right.sum())


@pytest.mark.parametrize("mu", [0.5, 2.0, 4.0])
def test_gaussian_mechanism_bounds_never_exceed_truth(mu):
    """100 audits of a mu-GDP mechanism: a bound above the true eps may happen with probability
    <= beta = 5% per audit (binomial 5% + 4 sd = 14 allowed); the loose bounds never get there."""
    rng = np.random.default_rng(int(mu * 100))
    delta = 1e-5
    eps_true = gdp_epsilon(mu, delta)
    over = {"dp": 0, "fdp": 0, "mu": 0}
    worst = 0.0
    for _ in range(100):
        r, v = _gaussian_game(rng, 2000, mu, 100)
        e1 = bounds.epsilon_lower_bound(2000, r, v, delta)
        e2 = bounds.epsilon_lower_bound_fdp(2000, r, v, delta)
        m1 = bounds.mu_lower_bound(2000, r, v)
        over["dp"] += e1 > eps_true
        over["fdp"] += e2 > eps_true
        over["mu"] += m1 > mu
        worst = max(worst, e1, e2)
    assert all(c <= 14 for c in over.values()), over
    assert worst < eps_true, (worst, eps_true)


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_randomized_response_bound_valid_and_tight(eps):
    """Randomized response is the worst case of eps-DP, so the bound is tight there: with m = 10^5
    guesses it gets within 3% of the truth (above it by 1% only with probability ~1e-3), and over
    200 audits at m = 2000 it exceeds the truth no more often than beta = 5% allows (+4 sd)."""
    rng = np.random.default_rng(7)
    r, v = _rr_game(rng, 100_000, eps)
    lo = bounds.epsilon_lower_bound(100_000, r, v, 0.0)
    lo_f = bounds.epsilon_lower_bound_fdp(100_000, r, v, 1e-9)
    assert 0.97 * eps <= lo <= 1.01 * eps
    assert 0.97 * eps <= lo_f <= 1.01 * eps
    over_dp = over_fdp = 0
    for _ in range(200):
        r, v = _rr_game(rng, 2000, eps)
        over_dp += bounds.epsilon_lower_bound(2000, r, v, 0.0) > eps
        over_fdp += bounds.epsilon_lower_bound_fdp(2000, r, v, 1e-9) > eps
    assert over_dp <= 22 and over_fdp <= 22, (over_dp, over_fdp)


def test_gaussian_fdp_close_on_easy_configuration():
    """mu = 1, m = 10^5, 1000 + 1000 guesses: the GDP-family audit recovers >= 70% of mu."""
    rng = np.random.default_rng(3)
    r, v = _gaussian_game(rng, 100_000, 1.0, 1000)
    mu_lo = bounds.mu_lower_bound(100_000, r, v)
    assert 0.7 <= mu_lo <= 1.0


def test_no_signal_gives_zero():
    rng = np.random.default_rng(5)
    r, v = _gaussian_game(rng, 5000, 0.0, 500)
    assert bounds.epsilon_lower_bound(5000, r, v, 1e-5) == 0.0
    assert bounds.mu_lower_bound(5000, r, v) == 0.0


@pytest.mark.parametrize("args, match", [
    ((10, 11, 5), "v .correct. <= r"),
    ((10, 5, 6), "v .correct. <= r"),
    ((10.5, 5, 3), "m must be a whole number"),
    ((True, 1, 1), "m must be a whole number"),
])
def test_bad_counts(args, match):
    with pytest.raises(ValueError, match=match):
        bounds.epsilon_lower_bound(*args, delta=1e-5)


def test_bad_delta_beta_family():
    with pytest.raises(ValueError, match="delta"):
        bounds.epsilon_lower_bound(10, 5, 5, delta=1.5)
    with pytest.raises(ValueError, match="beta"):
        bounds.epsilon_lower_bound(10, 5, 5, delta=1e-5, beta=0.0)
    with pytest.raises(ValueError, match="family"):
        bounds.epsilon_lower_bound_fdp(10, 5, 5, 1e-5, family="rdp")
    with pytest.raises(ValueError, match="epsilon"):
        bounds.p_value_approx_dp(10, 5, 5, -1.0, 0.0)
