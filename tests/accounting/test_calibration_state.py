"""Calibration never overshoots; checkpoints round-trip; bad input is refused by name."""
import json
import math

import numpy as np
import pytest

from dpkern.accounting import (EdgeworthAccountant, GaussianAccountant, PRVAccountant,
                               RDPAccountant, create_accountant, get_noise_multiplier)

ALL = [RDPAccountant, PRVAccountant, GaussianAccountant, EdgeworthAccountant]


def _eps(name, sigma, q, steps, delta):
    acc = create_accountant(name)
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("name,expected", [("rdp", 0.917), ("prv", 0.883)])
def test_reference_calibration(name, expected):
    sigma = get_noise_multiplier(8.0, 1e-5, 0.01, 10_000, accountant=name)
    assert sigma == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("name,cases", [("rdp", 12), ("gdp", 12), ("prv", 6)])
def test_calibration_never_overshoots(name, cases):
    """Property: for random (eps, delta, q, T), eps(sigma) <= target < eps(sigma - tol)."""
    rng = np.random.default_rng(1234)
    for _ in range(cases):
        target = float(np.exp(rng.uniform(np.log(0.3), np.log(20))))
        delta = float(10 ** rng.uniform(-8, -3))
        q = float(10 ** rng.uniform(-3, 0))
        steps = int(10 ** rng.uniform(0, 4.5))
        sigma = get_noise_multiplier(target, delta, q, steps, accountant=name, tolerance=1e-3)
        case = (name, target, delta, q, steps, sigma)
        assert _eps(name, sigma, q, steps, delta) <= target, case
        assert _eps(name, sigma - 1e-3, q, steps, delta) > target, case


def test_calibration_edge_cases():
    assert get_noise_multiplier(1.0, 1e-5, 0.0, 1000) == 0.0
    assert get_noise_multiplier(1.0, 1e-5, 0.01, 0) == 0.0
    with pytest.raises(ValueError, match="target_epsilon.*unreachable"):
        get_noise_multiplier(1e-4, 1e-5, 0.5, 10_000, accountant="rdp", sigma_max=50)
    for kwargs, name in [({"target_epsilon": -1}, "target_epsilon"),
                         ({"target_delta": 0}, "target_delta"), ({"sample_rate": 1.5}, "sample_rate"),
                         ({"steps": -3}, "steps"), ({"accountant": "moments"}, "accountant")]:
        args = {"target_epsilon": 1.0, "target_delta": 1e-5, "sample_rate": 0.01, "steps": 100}
        args.update(kwargs)
        with pytest.raises(ValueError, match=name):
            get_noise_multiplier(**args)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_state_round_trip(cls):
    delta = 0.2 if cls is EdgeworthAccountant else 1e-5  # the Edgeworth bound needs a large delta
    plan = [(1.0, 0.01, 3000), (1.3, 0.02, 1500), (1.0, 0.01, 2000)]
    straight = cls()
    for s, q, n in plan:
        straight.step(noise_multiplier=s, sample_rate=q, num_steps=n)

    first = cls()
    first.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=3000)
    saved = json.loads(json.dumps(first.state_dict()))  # must survive a plain serialiser
    resumed = cls()
    resumed.load_state_dict(saved)
    resumed.step(noise_multiplier=1.3, sample_rate=0.02, num_steps=1500)
    resumed.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=2000)
    assert resumed.history == straight.history
    assert resumed.get_epsilon(delta) == straight.get_epsilon(delta)
    assert len(resumed) == 6500


def test_state_refuses_other_accountant_or_settings():
    rdp = RDPAccountant()
    rdp.step(noise_multiplier=1.0, sample_rate=0.01)
    with pytest.raises(ValueError, match="'rdp' accountant"):
        PRVAccountant().load_state_dict(rdp.state_dict())
    with pytest.raises(ValueError, match="config"):
        RDPAccountant(orders=[2, 3]).load_state_dict(rdp.state_dict())


@pytest.mark.parametrize("cls", [RDPAccountant, PRVAccountant, GaussianAccountant],
                         ids=lambda c: c.__name__)
def test_many_steps_at_once_equals_one_by_one(cls):
    one_by_one, at_once = cls(), cls()
    for _ in range(500):
        one_by_one.step(noise_multiplier=1.1, sample_rate=0.02)
    at_once.step(noise_multiplier=1.1, sample_rate=0.02, num_steps=500)
    assert one_by_one.history == at_once.history == [(1.1, 0.02, 500)]
    assert one_by_one.get_epsilon(1e-5) == at_once.get_epsilon(1e-5) > 0


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_special_values(cls):
    acc = cls()
    assert acc.get_epsilon(1e-5) == 0.0  # nothing spent
    acc.step(noise_multiplier=1.0, sample_rate=0.0, num_steps=10**6)  # q = 0 samples nobody
    assert acc.get_epsilon(1e-5) == 0.0
    for sigma in (0.0, -1.0):
        bad = cls()
        bad.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
        bad.step(noise_multiplier=sigma, sample_rate=0.01)
        assert bad.get_epsilon(1e-5) == math.inf  # said plainly, no OverflowError


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_bad_input_names_the_argument(cls):
    acc = cls()
    for kwargs, name in [({"sample_rate": -0.1}, "sample_rate"), ({"sample_rate": 1.01}, "sample_rate"),
                         ({"num_steps": -1}, "num_steps"), ({"num_steps": 2.5}, "num_steps"),
                         ({"noise_multiplier": float("nan")}, "noise_multiplier"),
                         ({"noise_multiplier": "x"}, "noise_multiplier")]:
        args = {"noise_multiplier": 1.0, "sample_rate": 0.01, "num_steps": 1}
        args.update(kwargs)
        with pytest.raises(ValueError, match=name):
            acc.step(**args)
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    for delta in (0.0, 1.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="delta"):
            acc.get_epsilon(delta)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_tiny_sigma_is_finite_or_inf_never_an_exception(cls):
    acc = cls()
    acc.step(noise_multiplier=0.05, sample_rate=0.01, num_steps=100)
    try:
        eps = acc.get_epsilon(0.3)
    except ValueError as exc:  # only the Edgeworth bound may refuse, and says why
        assert cls is EdgeworthAccountant and "does not converge" in str(exc)
        return
    assert eps > 1.0
