"""Edgeworth accountant: cumulants, exactness at q=1, the non-conservative case, the bound."""
import math

import numpy as np
import pytest
from scipy import integrate, optimize

from dpkern.accounting import (EdgeworthAccountant, EdgeworthBoundError, PRVAccountant,
                               get_noise_multiplier)
from dpkern.accounting.edgeworth import step_cumulants
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
    assert e_q == pytest.approx(0.0417, abs=1e-4)
    with pytest.raises(EdgeworthBoundError) as info:
        acc.get_epsilon(1e-5)
    exc = info.value
    assert exc.error == e_q and exc.delta == 1e-5 and exc.steps == 10_000
    msg = str(exc)
    assert "e_Q < delta" in msg and f"{e_q:.4g}" in msg and "any delta >" in msg
    assert f"{exc.steps_needed:.3g} steps" in msg
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
