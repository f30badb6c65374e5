"""Edgeworth accountant: cumulants, exactness at q=1, the non-conservative case, the bound."""
import math
import time
import warnings

import numpy as np
import pytest
from scipy import integrate, optimize, special

from dpkern.accounting import (EdgeworthAccountant, EdgeworthBoundError, PRVAccountant,
                               get_noise_multiplier)
from dpkern.accounting.edgeworth import (_log_normal_cells, certified_step_moments,
                                         step_cumulants, step_third_moment_bound)
from tests.accounting._oracles import exact_gaussian_eps


def _acc(sigma, q, steps, **kw):
    acc = EdgeworthAccountant(**kw)
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    return acc


@pytest.mark.parametrize("sigma,q", [(0.8, 0.01), (2.0, 0.3), (0.6, 0.0297)])
def test_cumulants_match_adaptive_quadrature(sigma, q):
    mu = 1 / sigma

    def loss(x):
        return np.logaddexp(math.log1p(-q), math.log(q) + mu * x - mu * mu / 2)

    def phi(x, m=0.0):
        return math.exp(-(x - m) ** 2 / 2) / math.sqrt(2 * math.pi)

    def moments(dens):
        return [integrate.quad(lambda x: loss(x) ** k * dens(x), -40, 40 + mu, limit=400,
                               epsabs=1e-14, epsrel=1e-12)[0] for k in (1, 2, 3, 4)]

    def cumulants(m):
        m1, m2, m3, m4 = m
        return [m1, m2 - m1**2, m3 - 3 * m2 * m1 + 2 * m1**3,
                m4 - 4 * m3 * m1 - 3 * m2**2 + 12 * m2 * m1**2 - 6 * m1**4]

    kp, kq, _ = step_cumulants(sigma, q)
    ref_p = cumulants(moments(phi))
    ref_q = cumulants(moments(lambda x: (1 - q) * phi(x) + q * phi(x, mu)))
    np.testing.assert_allclose(kp, ref_p, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(kq, ref_q, rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize("sigma,steps", [(1.0, 100), (3.0, 1000), (0.7, 10)])
def test_full_batch_is_exact(sigma, steps):
    # q = 1: the loss is Gaussian, kappa_3 = kappa_4 = 0, so the expansion is exact.
    acc = _acc(sigma, 1.0, steps)
    exact = exact_gaussian_eps(sigma, steps, 1e-5)
    for order in (1, 2):
        assert acc.get_epsilon_estimate(1e-5, order=order) == pytest.approx(exact, rel=1e-6)


def test_estimate_is_not_conservative_and_calibration_refuses():
    q, steps, delta, target = 2000 / 67349, 660, 1e-5, 8.0

    def estimate(sigma):
        return _acc(sigma, q, steps).get_epsilon_estimate(delta) - target
    sigma_ew = optimize.brentq(estimate, 0.5, 1.5, xtol=1e-6)
    assert sigma_ew == pytest.approx(0.786, abs=1e-3)
    tight = PRVAccountant()
    tight.step(noise_multiplier=sigma_ew, sample_rate=q, num_steps=steps)
    eps, err = tight.get_epsilon_and_error(delta)
    assert eps - err > 8.25  # the estimate's sigma really spends ~8.30 > 8
    assert eps == pytest.approx(8.30, abs=0.01)
    # the accountant never hands out the estimate as its epsilon
    with pytest.raises(EdgeworthBoundError, match="does not converge"):
        _acc(sigma_ew, q, steps).get_epsilon(delta)
    with pytest.raises(EdgeworthBoundError, match="rigorous bound"):
        get_noise_multiplier(target, delta, q, steps, accountant="edgeworth")
    # the tight accountant calibrates above the estimate's sigma
    assert get_noise_multiplier(target, delta, q, steps, accountant="prv") > sigma_ew + 0.01


@pytest.mark.parametrize("sigma,delta", [(1.0, 0.1), (1.5, 0.05), (3.0, 0.03)])
def test_bound_is_reported_and_above_tight_value(sigma, delta):
    acc = _acc(sigma, 0.01, 10_000)
    rep = acc.report(delta)
    assert rep["bound"] is not None and rep["bound_error"] == ""
    assert rep["bound"] == acc.get_epsilon(delta)
    tight = PRVAccountant()
    tight.step(noise_multiplier=sigma, sample_rate=0.01, num_steps=10_000)
    assert rep["bound"] >= tight.get_epsilon(delta)  # rigorous: never below the tight bound
    assert rep["estimate_order1"] == pytest.approx(tight.get_epsilon(delta), rel=0.1)


def test_report_labels_both_when_bound_fails():
    rep = _acc(1.0, 0.01, 10_000).report(1e-5)
    assert rep["bound"] is None and "does not converge" in rep["bound_error"]
    assert rep["estimate_order1"] == pytest.approx(6.38, abs=0.01)
    assert rep["estimate_order2"] == pytest.approx(6.30, abs=0.01)


def test_calibration_with_bound_never_overshoots():
    sigma = get_noise_multiplier(2.0, 0.2, 0.01, 10_000, accountant="edgeworth")
    assert _acc(sigma, 0.01, 10_000).get_epsilon(0.2) <= 2.0
    assert _acc(sigma - 1e-3, 0.01, 10_000).get_epsilon(0.2) > 2.0


def test_refusal_says_which_condition_failed_and_what_would_converge():
    acc = _acc(1.0, 0.01, 10_000)
    e_q = acc.berry_esseen_error()
    # 0.0417 with the Cauchy-Schwarz third moment; 0.0273 with the certified moments (see
    # test_certified_e_q_smaller_than_cauchy_schwarz_by_stated_factor)
    assert e_q == pytest.approx(0.0273, abs=1e-4)
    with pytest.raises(EdgeworthBoundError) as info:
        acc.get_epsilon(1e-5)
    exc = info.value
    assert exc.error == e_q and exc.delta == 1e-5 and exc.steps == 10_000
    msg = str(exc)
    assert "e_Q < delta" in msg and f"{e_q:.4g}" in msg and "any delta >" in msg
    assert f"{exc.steps_needed:.3g} steps" in msg
    # ... and says the paper's first-order bound is absent, and where the reason is written down
    assert "Theorem 2.1) is not implemented" in msg and "README.md, 'Gap'" in msg
    # the stated remedies are exact: just above e_Q converges, just below refuses
    assert math.isfinite(acc.get_epsilon(e_q * 1.01))
    with pytest.raises(EdgeworthBoundError):
        acc.get_epsilon(e_q * 0.99)
    # ... and so does the stated number of steps at a delta below e_Q (e_Q ~ 1/sqrt(steps))
    delta = 0.02
    with pytest.raises(EdgeworthBoundError) as info:
        acc.get_epsilon(delta)
    need = int(info.value.steps_needed)
    assert need == pytest.approx(10_000 * (e_q / delta) ** 2, rel=1e-3)
    with pytest.raises(EdgeworthBoundError):
        _acc(1.0, 0.01, int(need * 0.99)).get_epsilon(delta)
    bound = _acc(1.0, 0.01, need).get_epsilon(delta)
    tight = PRVAccountant()
    tight.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=need)
    assert bound >= tight.get_epsilon(delta)  # still rigorous there


def test_calibration_refusal_reports_smallest_error_seen():
    with pytest.raises(EdgeworthBoundError) as info:
        get_noise_multiplier(8.0, 1e-5, 2000 / 67349, 660, accountant="edgeworth")
    msg = str(info.value)
    assert "needs e_Q < target_delta" in msg and "smallest e_Q was" in msg
    assert info.value.error > 1e-5 and info.value.steps_needed > 660


# --- certified Berry-Esseen moments (certified_step_moments / step_third_moment_bound) ---------
# e_Q = C * E|L - kappa_1|^3 / Var^1.5 is a bound only if the third absolute moment is bounded
# ABOVE and the variance BELOW. The references are adaptive quadrature written here, from the
# definition, split at the root x0 of L = mean where |L - mean|^3 has its kink.

MOMENT_GRID = [(1.0, 0.01), (0.3, 0.01), (100.0, 1e-6), (1.0, 1.0), (0.786, 2000 / 67349),
               (2.0, 0.3), (5.0, 1e-3), (0.5, 0.9), (0.05, 0.01), (1000.0, 0.0297)]


def _ref_loss(x, mu, q):
    t = mu * x - mu * mu / 2
    return t if q == 1.0 else float(np.logaddexp(math.log1p(-q), math.log(q) + t))


def _reference_moments(sigma, q):
    """(E_Q L, Var_Q L, E_Q|L - E_Q L|^3) by scipy quad (1e-12 relative asked; the mpmath test
    below confirms 1e-10 at sigma=1, q=0.01)."""
    mu = 1 / sigma

    def dens(x):
        return ((1 - q) * math.exp(-x * x / 2) + q * math.exp(-(x - mu) ** 2 / 2)) / math.sqrt(
            2 * math.pi)

    def integral(f, cuts):
        cuts = sorted(set(cuts))
        return sum(integrate.quad(lambda x: f(x) * dens(x), u, v, limit=500, epsabs=0,
                                  epsrel=1e-12)[0] for u, v in zip(cuts[:-1], cuts[1:]))

    cuts = [-40.0, -8.0, 0.0, mu, mu + 8.0, mu + 40.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        mean = integral(lambda x: _ref_loss(x, mu, q), cuts)
        x0 = optimize.brentq(lambda x: _ref_loss(x, mu, q) - mean, -60.0, 60.0 + mu, xtol=1e-14)
        var = integral(lambda x: (_ref_loss(x, mu, q) - mean) ** 2, cuts + [x0])
        abs3 = integral(lambda x: abs(_ref_loss(x, mu, q) - mean) ** 3, cuts + [x0])
    return mean, var, abs3


def _check_certified_upper(bound, reference, tight=2e-3):
    """A certified upper bound: never below the reference (up to the reference's own ~1e-10
    accuracy, not a percent), and within `tight` of it (so it is not vacuous)."""
    assert bound >= reference * (1 - 1e-9), f"bound {bound!r} below reference {reference!r}"
    assert bound <= reference * (1 + tight), f"bound {bound!r} loose vs {reference!r}"


@pytest.mark.parametrize("sigma,q", MOMENT_GRID)
def test_certified_moments_bracket_reference(sigma, q):
    lo, hi, var_lo, abs3_hi = certified_step_moments(sigma, q)
    mean, var, abs3 = _reference_moments(sigma, q)
    _check_certified_upper(abs3_hi, abs3)  # measured: 1e-5 ... 5e-4 above
    # the variance is a lower bound, within 0.1% (measured 0.02-0.03%)
    assert var * (1 - 1e-3) <= var_lo <= var * (1 + 1e-9)
    # the mean bracket contains the reference mean and is narrow against the spread
    assert lo <= mean <= hi and hi - lo < 2e-3 * math.sqrt(var)
    # Lyapunov: E|X|^3 >= (E X^2)^1.5, so the bound can never be below var_lo^1.5
    assert abs3_hi >= var_lo ** 1.5


def test_certified_check_is_strict():
    # mutation check: a "bound" 1% (or 1e-8) below the reference value must fail the test above
    _, _, abs3 = _reference_moments(1.0, 0.01)
    for factor in (0.99, 1 - 1e-8):
        with pytest.raises(AssertionError, match="below reference"):
            _check_certified_upper(abs3 * factor, abs3)
    with pytest.raises(AssertionError, match="loose"):  # ... and so must Cauchy-Schwarz (1.53x)
        _, kq, m4 = step_cumulants(1.0, 0.01)
        _check_certified_upper(math.sqrt(kq[1] * m4), abs3)


def test_reference_quadrature_matches_mpmath():
    # the scipy reference itself, against 30-digit mpmath quadrature at sigma=1, q=0.01
    mpmath = pytest.importorskip("mpmath")
    mean, var, abs3 = _reference_moments(1.0, 0.01)
    with mpmath.workdps(30):
        q, mu = mpmath.mpf("0.01"), mpmath.mpf(1)

        def loss(x):
            return mpmath.log(1 - q + q * mpmath.exp(mu * x - mu * mu / 2))

        def dens(x):
            return ((1 - q) * mpmath.npdf(x) + q * mpmath.npdf(x, mu))

        cuts = [-40, -8, 0, 1, 9, 41]
        m = mpmath.quad(lambda x: loss(x) * dens(x), cuts)
        x0 = mpmath.findroot(lambda x: loss(x) - m, 0.2)
        cuts3 = sorted(cuts + [x0])
        a3 = mpmath.quad(lambda x: abs(loss(x) - m) ** 3 * dens(x), cuts3)
    assert mean == pytest.approx(float(m), rel=1e-10)
    assert abs3 == pytest.approx(float(a3), rel=1e-10)


def test_log_ndtr_and_cell_masses_within_stated_error():
    # certified_step_moments assumes log_ndtr within 32u (1 + |value|) (tested here at 16u) and
    # derives each cell mass's relative error allowance from it; check both against mpmath
    mpmath = pytest.importorskip("mpmath")
    u = np.finfo(float).eps / 2
    xs = np.concatenate([-np.geomspace(1e-3, 1100, 60), np.linspace(-8, 40, 97)])
    with mpmath.workdps(40):
        for x in xs:
            exact = mpmath.log(mpmath.ncdf(mpmath.mpf(float(x))))
            assert abs(special.log_ndtr(x) - float(exact)) <= 16 * u * (1 + abs(float(exact)))
        edges = np.concatenate([np.arange(-1000.0, -999.99, 1.25e-4), np.arange(-40.0, -39.0, 0.05),
                                np.arange(-6.0, -5.99, 2.5e-4), np.arange(-1e-3, 1e-3, 2.5e-4),
                                np.arange(3.0, 3.01, 2e-3), np.arange(38.0, 40.0, 0.05)])
        for a, b in zip(edges[:-1], edges[1:]):
            if b - a > 0.1:
                continue
            log_mass, rel = _log_normal_cells(np.array([a, b]), 0.0)
            lo, hi = (-b, -a) if a + b > 0 else (a, b)  # no cancellation against 1
            exact = mpmath.ncdf(mpmath.mpf(float(hi))) - mpmath.ncdf(mpmath.mpf(float(lo)))
            err = abs(mpmath.exp(mpmath.mpf(float(log_mass[0]))) / exact - 1)
            # measured: err <= 1.4e-9 at -1000 (allowance 6e-8), <= 6e-12 elsewhere (2e-10)
            assert err <= rel[0] and rel[0] < (1e-7 if a < -100 else 1e-9)
        # shifted cells, y = fl(x - fl(1/sigma)) against the exact x - 1/sigma (sigma = 0.001)
        sigma = 0.001
        mu, mu_exact = 1 / sigma, 1 / mpmath.mpf(sigma)
        x = np.concatenate([np.arange(-40.0, -39.0, 0.05), np.arange(mu - 0.01, mu + 0.01, 2.5e-4)])
        log_mass, rel = _log_normal_cells(x - mu, mu)
        for i, (a, b) in enumerate(zip(x[:-1], x[1:])):
            if b - a > 0.1:
                continue
            lo, hi = mpmath.mpf(float(a)) - mu_exact, mpmath.mpf(float(b)) - mu_exact
            lo, hi = (-hi, -lo) if lo + hi > 0 else (lo, hi)
            exact = mpmath.ncdf(hi) - mpmath.ncdf(lo)
            assert abs(mpmath.exp(mpmath.mpf(float(log_mass[i]))) / exact - 1) <= rel[i]


@pytest.mark.parametrize("sigma,q", MOMENT_GRID + [(0.01, 0.5), (0.001, 0.01), (1e4, 0.5)])
def test_certified_third_moment_below_cauchy_schwarz(sigma, q):
    # both are upper bounds; the certified one is the one used (by 1.005x ... 1.53x here)
    _, kq, m4 = step_cumulants(sigma, q)
    cert = certified_step_moments(sigma, q)[3]
    assert math.isfinite(cert) and cert <= math.sqrt(kq[1] * m4)
    assert step_third_moment_bound(sigma, q) == cert


@pytest.mark.parametrize("sigma,q", [(1.0, 0.01), (0.786, 2000 / 67349), (2.0, 0.3)])
def test_certified_third_moment_consistent_with_monte_carlo(sigma, q):
    rng = np.random.default_rng(20240611)
    n, mu = 2_000_000, 1 / sigma
    x = rng.standard_normal(n) + mu * (rng.random(n) < q)
    loss = np.logaddexp(math.log1p(-q), math.log(q) + mu * x - mu * mu / 2)
    dev3 = np.abs(loss - loss.mean()) ** 3
    est, se = dev3.mean(), dev3.std() / math.sqrt(n)
    cert = certified_step_moments(sigma, q)[3]
    assert abs(cert - est) <= 5 * se + 1e-3 * cert  # consistent (se: 0.3-2% of the value)
    _, kq, m4 = step_cumulants(sigma, q)
    assert math.sqrt(kq[1] * m4) > est + 5 * se  # while Cauchy-Schwarz is visibly above


def test_certified_moments_fast_enough_for_calibration():
    # get_noise_multiplier(accountant="edgeworth") evaluates a new sigma each time (~10-20 of them)
    times = []
    for sigma in (0.9, 0.001, 1000.0):
        t0 = time.perf_counter()
        certified_step_moments.__wrapped__(sigma, 0.01)
        times.append(time.perf_counter() - t0)
    assert max(times) < 0.2, times  # ~0.01-0.03 s measured


def test_certified_e_q_smaller_than_cauchy_schwarz_by_stated_factor():
    # sigma=1, q=0.01, T=1e4: e_Q 0.0417 (Cauchy-Schwarz moment, Gauss-Hermite variance) ->
    # 0.0273 (certified moments): x0.655, so the steps needed at delta=1e-5 drop by x0.43
    acc = _acc(1.0, 0.01, 10_000)
    _, kq, m4 = step_cumulants(1.0, 0.01)
    old = 0.4748 * 10_000 * math.sqrt(kq[1] * m4) / (10_000 * kq[1]) ** 1.5
    assert old == pytest.approx(0.0417, abs=1e-4)
    assert acc.berry_esseen_error() == pytest.approx(0.0273, abs=1e-4)
    assert acc.berry_esseen_error() / old == pytest.approx(0.655, abs=2e-3)
    # delta=0.03 was refused before (0.0417 > 0.03); it converges now, still above the tight value
    bound = acc.get_epsilon(0.03)
    tight = PRVAccountant()
    tight.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10_000)
    assert bound >= tight.get_epsilon(0.03)


@pytest.mark.parametrize("sigma,q", [(1.0, 0.01), (0.3, 0.01), (1.0, 1.0), (0.5, 0.9)])
def test_certified_moments_hold_on_a_coarse_grid(monkeypatch, sigma, q):
    # any partition gives a valid bound, however coarse (an accurate quadrature rule, e.g. the
    # lower sum or a midpoint rule, falls below the reference here); only the tightness changes
    import dpkern.accounting.edgeworth as ew
    monkeypatch.setattr(ew, "_CELL_ZONES", ((6.0, 0.25), (10.0, 0.25)))
    monkeypatch.setattr(ew, "_CELL_COARSE", 0.25)
    lo, hi, var_lo, abs3_hi = ew.certified_step_moments.__wrapped__(sigma, q)
    mean, var, abs3 = _reference_moments(sigma, q)
    assert lo <= mean <= hi and var_lo <= var
    _check_certified_upper(abs3_hi, abs3, tight=0.6)  # 1.25-1.56x at this spacing
