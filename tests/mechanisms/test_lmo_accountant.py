"""LMO-DP accounting: the paper's known check, the MGF domain, the certified bound, the search."""
import math

import numpy as np
import pytest
import torch

from dpkern.mechanisms import lmo_accountant as A
from dpkern.mechanisms.lmo_params import PAPER_DEFAULT, LMOParams
from dpkern.mechanisms.lmo_search import default_usefulness, search, usefulness

DELTA = 1e-10


def test_known_check_reproduces_the_artifact():
    """a=(0.1,0.1,0.1), theta=0.5, k=1, lam=5, U[1,2], delta=1e-10 -> eps_lmo 0.293, sigma_eq 23.26."""
    eps, order = A.lmo_epsilon(PAPER_DEFAULT, DELTA, mgf_domain="artifact")
    assert eps == pytest.approx(0.29321, abs=5e-5) and order == 128
    assert A.sigma_equivalent(eps, DELTA) == pytest.approx(23.256, abs=5e-3)


def test_known_check_on_the_mgf_domain_is_1_31():
    """The same formula with the undefined orders dropped (alpha - 1 >= 1/(a1 theta) = 20)."""
    eps, order = A.lmo_epsilon(PAPER_DEFAULT, DELTA)
    assert eps == pytest.approx(1.30830, abs=5e-5) and order == 20


def test_undefined_orders_are_dropped():
    r = A.lmo_rdp(PAPER_DEFAULT)
    finite = A.PAPER_ORDERS[np.isfinite(r)]
    # M(alpha-1) exists iff a1*theta*(alpha-1) < 1 and a3*(alpha-1) < lam: alpha <= 20 here.
    assert finite.min() == 2 and finite.max() == 20 and finite.size == 19
    assert np.all(r[np.isfinite(r)] > 0)
    # The artifact keeps the orders where both out-of-domain factors are negative (alpha >= 52).
    ra = A.lmo_rdp(PAPER_DEFAULT, mgf_domain="artifact")
    fa = A.PAPER_ORDERS[np.isfinite(ra)]
    assert set(fa[fa > 20]) == set(range(52, 129))
    np.testing.assert_allclose(ra[:19], r[:19], rtol=1e-10)


def test_mgf_matches_a_monte_carlo_mean_with_lam_as_rate():
    """log_mgf against E[exp(t u)] from numpy draws; lam is a RATE (numpy takes scale = 1/lam)."""
    p = LMOParams(a1=0.3, a3=0.5, a4=0.2, theta=0.7, k=2.0, lam=4.0, a=0.5, b=3.0)
    rng = np.random.default_rng(0)
    n = 400_000
    u = (p.a1 * rng.gamma(p.k, p.theta, n) + p.a3 * rng.exponential(1 / p.lam, n)
         + p.a4 * rng.uniform(p.a, p.b, n))
    for t in (-3.0, -0.5, 0.7, 1.5):
        x = np.exp(t * u)
        se = x.std() / math.sqrt(n)
        assert abs(math.exp(A.log_mgf(p, t)) - x.mean()) < 5 * se, t
    u_scale = (p.a1 * rng.gamma(p.k, p.theta, n) + p.a3 * rng.exponential(p.lam, n)
               + p.a4 * rng.uniform(p.a, p.b, n))  # the artifact's sampler: lam as a scale
    x = np.exp(-0.5 * u_scale)
    assert abs(math.exp(A.log_mgf(p, -0.5)) - x.mean()) > 20 * x.std() / math.sqrt(n)
    assert np.isnan(A.log_mgf(p, 1 / (p.a1 * p.theta)))  # edge of the domain: undefined


def test_coordinate_rdp_reduces_to_laplace():
    """u nearly constant (a narrow uniform only) -> the Laplace RDP closed form at scale 1/u."""
    p = LMOParams(a1=0.0, a3=0.0, a4=1.0, a=0.8, b=0.8 + 1e-9)
    o = np.arange(2, 30, dtype=float)
    lap = np.log(o / (2 * o - 1) * np.exp((o - 1) * 0.8) + (o - 1) / (2 * o - 1) * np.exp(-o * 0.8)) / (o - 1)
    np.testing.assert_allclose(A.coordinate_rdp(p, o), lap, rtol=1e-7)


def test_rdp_to_epsilon_matches_dp_accounting_on_a_gaussian():
    """The conversion against dp_accounting's for RDP alpha/(2 sigma^2) (no subsampling)."""
    import dp_accounting
    o = np.arange(2, 129, dtype=float)
    acc = dp_accounting.rdp.RdpAccountant(orders=list(o))
    acc.compose(dp_accounting.GaussianDpEvent(3.0), 10)
    eps, _ = A.rdp_to_epsilon(o, 10 * o / (2 * 9.0), 1e-6)
    assert eps == pytest.approx(acc.get_epsilon(1e-6), rel=2e-3)


def test_reported_epsilon_is_the_subsampled_gaussian_at_sigma_eq():
    from dpkern.accounting.rdp import RDPAccountant
    rep = A.reported_epsilon(PAPER_DEFAULT, sample_rate=0.015, steps=400, delta=DELTA)
    acc = RDPAccountant(orders=list(range(2, 129)))
    acc.step(noise_multiplier=A.sigma_equivalent(1.30830, DELTA), sample_rate=0.015, num_steps=400)
    assert rep.epsilon == pytest.approx(acc.get_epsilon(DELTA), rel=1e-4)
    assert rep.certified is False and "not certified" in str(rep)


def test_general_subsampling_bound_dominates_the_tight_gaussian():
    """Zhu-Wang's bound for any mechanism, applied to a Gaussian, is above the exact subsampled
    Gaussian RDP and not far from it; at q = 1 it is eps(alpha) + log(3)/(alpha-1) for alpha >= 3
    (alpha = 2 has no factor-3 term)."""
    import dp_accounting
    o = np.arange(2, 65, dtype=float)
    for sigma, q in ((1.0, 0.01), (2.0, 0.1), (0.8, 0.003)):
        acc = dp_accounting.rdp.RdpAccountant(orders=list(o))
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 1)
        tight = np.asarray(acc._rdp)
        ours = A.subsampled_rdp_upper(o / (2 * sigma**2), q)
        assert np.all(ours >= tight * (1 - 1e-9)), (sigma, q)
        assert ours[0] <= 2.5 * tight[0] + 1e-12, (sigma, q)
    want = o / 2 + np.where(o > 2, np.log(3) / (o - 1), 0.0)
    np.testing.assert_allclose(A.subsampled_rdp_upper(o / 2, 1.0), want, rtol=1e-12)


def test_certified_bound_is_above_the_one_dimensional_one():
    o = np.arange(2, 21, dtype=float)
    rho = A.certified_step_rdp(PAPER_DEFAULT, o)
    assert np.all(rho >= A.coordinate_rdp(PAPER_DEFAULT, o))               # d = 1 is a case
    assert np.all(rho >= o * PAPER_DEFAULT.second_moment_u() / 2)         # d -> infinity limit
    rep = A.certified_epsilon(PAPER_DEFAULT, sample_rate=0.015, steps=400, delta=DELTA)
    reported = A.reported_epsilon(PAPER_DEFAULT, sample_rate=0.015, steps=400, delta=DELTA)
    assert rep.certified and math.isfinite(rep.epsilon) and rep.epsilon > 2 * reported.epsilon


def test_l1_route_certifies_nothing_at_model_scale():
    assert np.all(np.isinf(A.l1_route_step_rdp(PAPER_DEFAULT, 355_000_000)))


def test_usefulness_is_p_abs_noise_below_gamma():
    """1 - M(-gamma) against the fraction of reference noise draws with |noise| <= gamma."""
    from dpkern.mechanisms.lmo_ref import STREAM_LMO, lmo_noise_ref
    from dpkern.noise import NoiseGenerator
    words = NoiseGenerator(secure=False, seed=11).kernel_words(0, STREAM_LMO)
    z = lmo_noise_ref(60_000, PAPER_DEFAULT, words=words)
    frac = float((z.abs() <= 0.9).double().mean())
    assert abs(frac - default_usefulness(0.9)) < 5 * math.sqrt(frac * (1 - frac) / z.numel())


SMALL = dict(weights=(0.1, 0.3, 0.6, 0.9), lams=(1.0, 5.0, 10.0, 20.0))


def test_search_finds_a_feasible_better_config():
    target = 1.4
    r = search(target, DELTA, **SMALL)
    assert r.eps_lmo < target and r.n_feasible > 0
    eps, _ = A.lmo_epsilon(r.params, DELTA)
    assert eps == pytest.approx(r.eps_lmo, rel=1e-9) and eps < target   # recomputed, not trusted
    assert r.usefulness == pytest.approx(float(usefulness(r.params)), rel=1e-9)
    assert r.usefulness > default_usefulness() + 0.1


def test_search_under_the_artifact_domain_exploits_undefined_orders():
    """With the artifact's evaluation the best 'eps < 0.3' config is only 'private' at orders where
    its MGF does not exist."""
    r = search(0.3, DELTA, mgf_domain="artifact", **SMALL)
    _, order = A.lmo_epsilon(r.params, DELTA, mgf_domain="artifact")
    assert r.params.a1 * r.params.theta * (order - 1) >= 1 or r.params.a3 * (order - 1) >= r.params.lam
    assert A.lmo_epsilon(r.params, DELTA)[0] > 0.3


def test_search_says_when_nothing_is_feasible():
    with pytest.raises(ValueError, match="no configuration"):
        search(1e-3, DELTA, weights=(0.5,))


@pytest.mark.parametrize("bad", [dict(a1=-0.1), dict(k=0.0), dict(lam=-1.0), dict(a=2.0, b=1.0),
                                 dict(a1=0.0, a3=0.0, a4=0.0), dict(theta=float("nan"))])
def test_params_reject_bad_values(bad):
    with pytest.raises(ValueError, match="LMOParams"):
        LMOParams(**bad)


def test_log_density_and_fisher_sigma():
    """Density integrates to 1; Fisher sigma is 1/u for a (nearly) constant u and lies between the
    certified bound's 1/sqrt(E[u^2]) and the paper's sigma_eq for the default config."""
    x = np.linspace(-3000, 3000, 3_000_001)
    for p in (PAPER_DEFAULT, LMOParams(a1=0.5, a3=0.2, a4=0.0, k=2.0, theta=0.8, lam=2.0)):
        assert np.exp(A.log_density(p, x)).sum() * (x[1] - x[0]) == pytest.approx(1, abs=1e-5)
    assert A.fisher_sigma(LMOParams(a1=0.0, a3=0.0, a4=1.0, a=0.8, b=0.8 + 1e-9)) == pytest.approx(
        1.25, rel=1e-5)
    s = A.fisher_sigma(PAPER_DEFAULT)
    assert 1 / math.sqrt(PAPER_DEFAULT.second_moment_u()) < s < 5.0 < 23.25
