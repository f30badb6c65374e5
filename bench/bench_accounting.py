"""Times noise calibration (the tight PLD accountant should take well under a second).

Each case first checks the calibrated sigma against the issue's reference value: a wrong answer is
never timed.
"""
import pytest

from dpkern.accounting import PRVAccountant, get_noise_multiplier

# (accountant, target eps, delta, q, steps, expected sigma)
CASES = [
    ("prv", 8.0, 1e-5, 0.01, 10_000, 0.883),
    ("rdp", 8.0, 1e-5, 0.01, 10_000, 0.917),
    ("prv", 3.0, 1e-5, 0.004, 100_000, None),
]


@pytest.mark.parametrize("accountant,eps,delta,q,steps,expected", CASES,
                         ids=lambda v: str(v))
def test_bench_calibration(benchmark, accountant, eps, delta, q, steps, expected):
    sigma = get_noise_multiplier(eps, delta, q, steps, accountant=accountant)
    if expected is not None:
        assert sigma == pytest.approx(expected, abs=2e-3)
    benchmark.extra_info.update(accountant=accountant, sigma=sigma, q=q, steps=steps)
    result = benchmark.pedantic(get_noise_multiplier, args=(eps, delta, q, steps),
                                kwargs={"accountant": accountant}, rounds=3, iterations=1)
    assert result == sigma


def test_bench_prv_get_epsilon(benchmark):
    def run():
        acc = PRVAccountant()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10_000)
        return acc.get_epsilon(1e-5)
    assert benchmark.pedantic(run, rounds=3, iterations=1) == pytest.approx(6.188, rel=1e-3)
