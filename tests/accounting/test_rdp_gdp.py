"""RDP and GDP accountants against dp_accounting, Opacus and the issue's reference table."""
import math
import subprocess
import sys

import numpy as np
import pytest
from opacus.accountants import GaussianAccountant as OpacusGDP
from opacus.accountants.analysis import rdp as opacus_rdp

from dpkern.accounting import GaussianAccountant, RDPAccountant
from dpkern.accounting.rdp import DEFAULT_ORDERS, compute_rdp, rdp_subsampled_gaussian
from tests.accounting._oracles import dpa_rdp, opacus_rdp_eps, quad_rdp

OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
INT_ORDERS = list(range(2, 64)) + [128, 256, 512]

# (sigma, RDP, GDP) at q=0.01, T=10000, delta=1e-5 (issue 3).
TABLE = [(0.8, 10.935, 9.641), (1.0, 6.713, 6.007), (1.5, 3.459, 3.138)]

# (sigma, q, T, delta): small q, q = 1, sigma 0.5 ... 20, T up to 1e5.
GRID = [
    (0.5, 0.001, 100_000, 1e-6), (0.7, 0.0002, 50_000, 1e-5), (1.0, 0.01, 1, 1e-5),
    (1.1, 0.05, 3_000, 1e-8), (2.0, 0.1, 100_000, 1e-5), (5.0, 0.01, 10_000, 1e-5),
    (20.0, 0.3, 100_000, 1e-5), (0.5, 1.0, 10, 1e-5), (3.0, 1.0, 1_000, 1e-6),
    (20.0, 1.0, 100_000, 1e-5),
]


def _ids(p):
    return "s{}-q{}-T{}-d{}".format(*p)


def _run(cls, sigma, q, steps, **kw):
    acc = cls(**kw)
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    return acc


def test_import_does_not_load_opacus():
    # opacus is a test-only oracle: importing our accounting must not pull it in
    code = ("import sys, dpkern.accounting; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'opacus'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("sigma,q,order", [
    (0.5, 1e-4, 1.1), (1.5, 1e-4, 1.1), (20.0, 1e-4, 1.1), (1.0, 0.01, 2.5), (20.0, 0.5, 1.1),
    (0.7, 0.3, 7.3), (1.0, 0.01, 2.0), (2.0, 0.999, 3.7), (5.0, 0.01, 17.0)], ids=str)
def test_rdp_per_order_against_quadrature(sigma, q, order):
    # independent oracle: the defining integral by adaptive quadrature. Opacus's series misses it
    # by 7.5e-13 at (0.5, 1e-4, 1.1) (2.7e-6 relative); ours must be within 1e-15 + 1e-9 rel.
    ref = quad_rdp(q, sigma, order)
    assert rdp_subsampled_gaussian(q, sigma, order) == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_rdp_closed_forms():
    assert rdp_subsampled_gaussian(0.0, 1.0, 2.5) == 0.0
    for order in (1.5, 2, 32):
        assert rdp_subsampled_gaussian(1.0, 2.0, order) == pytest.approx(order / 8, rel=1e-15)
    # order 2: A = 1 + q^2 (e^{1/sigma^2} - 1); large sigma keeps full relative precision
    for sigma, q in [(1.0, 0.01), (50.0, 1e-3), (0.3, 0.5)]:
        expected = math.log1p(q * q * math.expm1(1 / sigma**2))
        assert rdp_subsampled_gaussian(q, sigma, 2) == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 20.0])
@pytest.mark.parametrize("q", [1e-3, 0.01, 0.3, 0.5])
def test_rdp_per_order_matches_opacus(sigma, q):
    ours = compute_rdp(q, sigma, 1, DEFAULT_ORDERS)
    ref = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                            orders=list(DEFAULT_ORDERS)))
    # Opacus truncates its fractional-order series near 1e-13 absolute in A, up to ~1e-12 in RDP
    # at order 1.1 (the quadrature test above pins ours to 1e-15); elsewhere 1e-9 relative
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=3e-12)


@pytest.mark.parametrize("sigma,rdp,_gdp", TABLE)
def test_rdp_reference_table(sigma, rdp, _gdp):
    eps = _run(RDPAccountant, sigma, 0.01, 10_000).get_epsilon(1e-5)
    assert eps == pytest.approx(rdp, rel=1e-3)


def test_rdp_opacus_published_value():
    # Opacus's own RDP test value: sigma=1.5, q=0.04, 2250 steps, delta=1e-5.
    eps = _run(RDPAccountant, 1.5, 0.04, 2250, orders=OPACUS_ORDERS).get_epsilon(1e-5)
    assert eps == pytest.approx(7.32911117143, rel=1e-4)


@pytest.mark.parametrize("params", GRID, ids=_ids)
def test_rdp_matches_dp_accounting_and_opacus(params):
    sigma, q, steps, delta = params
    ours = _run(RDPAccountant, sigma, q, steps).get_epsilon(delta)
    assert ours == pytest.approx(opacus_rdp_eps([(sigma, q, steps)], delta, DEFAULT_ORDERS),
                                 rel=1e-9)
    # Integer orders: dp_accounting computes the same exact RDP.
    ours_int = _run(RDPAccountant, sigma, q, steps, orders=INT_ORDERS).get_epsilon(delta)
    assert ours_int == pytest.approx(dpa_rdp(sigma, q, steps, delta, INT_ORDERS), rel=1e-6)
    # All orders: dp_accounting 0.6's fractional-order RDP is a valid but larger bound, so ours
    # is never above it, and within 1e-3 wherever the best order is an integer one.
    dpa = dpa_rdp(sigma, q, steps, delta, DEFAULT_ORDERS)
    assert ours <= dpa * (1 + 1e-9)
    assert ours == pytest.approx(dpa, rel=1e-3) or ours < ours_int


def test_rdp_mixed_history_is_composition():
    hist = [(1.0, 0.01, 400), (2.0, 0.05, 300), (1.0, 0.01, 300)]
    acc = RDPAccountant(orders=OPACUS_ORDERS)
    for s, q, n in hist:
        acc.step(noise_multiplier=s, sample_rate=q, num_steps=n)
    assert acc.history == hist  # non-consecutive repeats stay separate entries
    assert acc.get_epsilon(1e-5) == pytest.approx(opacus_rdp_eps(hist, 1e-5, OPACUS_ORDERS), rel=1e-3)
    # grouping is order-free: same as 700 steps at (1, 0.01) then 300 at (2, 0.05)
    acc2 = RDPAccountant(orders=OPACUS_ORDERS)
    acc2.step(noise_multiplier=2.0, sample_rate=0.05, num_steps=300)
    acc2.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=700)
    assert acc2.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize("sigma,_rdp,gdp", TABLE)
def test_gdp_reference_table(sigma, _rdp, gdp):
    acc = _run(GaussianAccountant, sigma, 0.01, 10_000)
    assert acc.approximate is True
    assert acc.get_epsilon(1e-5) == pytest.approx(gdp, rel=1e-3)


@pytest.mark.parametrize("params", GRID, ids=_ids)
def test_gdp_matches_opacus(params):
    sigma, q, steps, delta = params
    ours = _run(GaussianAccountant, sigma, q, steps).get_epsilon(delta)
    ref = OpacusGDP()
    ref.history = [(sigma, q, steps)]
    expected = ref.get_epsilon(delta, poisson=True)
    assert ours == pytest.approx(expected, rel=1e-3, abs=1e-9)


def test_gdp_mu_adds_in_quadrature():
    acc = GaussianAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=300)
    acc.step(noise_multiplier=2.0, sample_rate=0.02, num_steps=500)
    mu2 = 300 * 0.01**2 * math.expm1(1.0) + 500 * 0.02**2 * math.expm1(0.25)
    assert acc.get_mu() == pytest.approx(math.sqrt(mu2), rel=1e-12)
