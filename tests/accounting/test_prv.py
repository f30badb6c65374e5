"""Tight PLD accountant: reference table, dp_accounting fine-grid oracle, exact q=1, Opacus PRV."""
import pytest

from dpkern.accounting import PRVAccountant
from tests.accounting._oracles import dpa_pld, exact_gaussian_eps, opacus_prv_bounds, pld_single

TABLE = [(0.8, 10.054), (1.0, 6.188), (1.5, 3.186)]  # q=0.01, T=1e4, delta=1e-5 (issue 3)

# (sigma, q, T, delta): small q, q = 1, sigma 0.5 ... 20, T up to 1e5.
GRID = [
    (0.5, 0.001, 100_000, 1e-6), (0.8, 0.01, 10_000, 1e-5), (1.1, 0.05, 3_000, 1e-8),
    (2.0, 0.1, 100_000, 1e-5), (5.0, 0.01, 10_000, 1e-5), (20.0, 0.01, 100_000, 1e-5),
    (20.0, 0.3, 1_000, 1e-5), (1.0, 0.002, 1, 1e-5),
]
EXACT = [(0.5, 10, 1e-5), (1.0, 100, 1e-5), (1.0, 1, 1e-3), (5.0, 100_000, 1e-6), (20.0, 100_000, 1e-5),
         (20.0, 1_000, 1e-5)]


def _ids(p):
    return "-".join(str(x) for x in p)


def _acc(sigma, q, steps):
    acc = PRVAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    return acc


@pytest.mark.parametrize("sigma,tight", TABLE)
def test_reference_table_and_opacus_prv(sigma, tight):
    eps, err = _acc(sigma, 0.01, 10_000).get_epsilon_and_error(1e-5)
    assert eps == pytest.approx(tight, rel=1e-3)
    assert 0 < err < 2e-3 * eps
    low, _, up = opacus_prv_bounds([(sigma, 0.01, 10_000)], 1e-5, eps_error=0.05)
    assert low <= eps <= up  # inside Opacus's rigorous PRV bracket


@pytest.mark.parametrize("params", GRID, ids=_ids)
def test_matches_fine_grid_dp_accounting(params):
    sigma, q, steps, delta = params
    acc = _acc(sigma, q, steps)
    eps, err = acc.get_epsilon_and_error(delta)
    # oracle: dp_accounting's PLD on a 4x finer grid (converges from above like ours)
    oracle = pld_single(sigma, q, steps, delta, acc.interval(acc._groups()) / 4)
    assert eps == pytest.approx(oracle, rel=1e-3)
    assert oracle - 1e-9 <= eps <= oracle + err  # an upper bound, loose by at most err


@pytest.mark.parametrize("sigma,steps,delta", EXACT, ids=lambda v: str(v))
def test_full_batch_against_exact_value(sigma, steps, delta):
    eps, err = _acc(sigma, 1.0, steps).get_epsilon_and_error(delta)
    exact = exact_gaussian_eps(sigma, steps, delta)
    assert exact - 1e-9 <= eps <= exact + err
    assert eps == pytest.approx(exact, rel=1e-3)


def test_mixed_history_matches_dp_accounting():
    hist = [(1.0, 0.01, 2_000), (3.0, 0.2, 500), (0.9, 0.005, 3_000)]
    acc = PRVAccountant()
    for s, q, n in hist:
        acc.step(noise_multiplier=s, sample_rate=q, num_steps=n)
    eps, err = acc.get_epsilon_and_error(1e-6)
    oracle = dpa_pld(hist, 1e-6, interval=acc.interval(acc._groups()) / 4)
    assert oracle - 1e-9 <= eps <= oracle + err
    assert acc.get_delta(eps) <= 1e-6 * (1 + 1e-6)
