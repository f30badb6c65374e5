"""Mechanism objects: LMO-DP's refusal without opt-in, its two accountings, Gaussian baseline."""
import math

import pytest
import torch

from dpkern.mechanisms import (PAPER_DEFAULT, GaussianMechanism, LMOMechanism, LMOParams,
                               UncertifiedEpsilonError)
from dpkern.mechanisms.lmo_ref import STREAM_LMO, lmo_noise_ref
from dpkern.noise import NoiseGenerator
from tests.conftest import kernel_devices

Q, T, DELTA = 0.0152, 394, 1e-10


def test_lmo_refuses_its_reported_epsilon_without_opt_in():
    with pytest.raises(UncertifiedEpsilonError, match="not a certified") as e:
        LMOMechanism(PAPER_DEFAULT)
    msg = str(e.value)
    assert "accept_uncertified_epsilon=True" in msg and "accounting='certified'" in msg
    assert "d-dimensional" in msg and "Gaussian" in msg
    with pytest.raises(UncertifiedEpsilonError):
        LMOMechanism(PAPER_DEFAULT, accept_uncertified_epsilon=1)  # truthy is not an opt-in


def test_lmo_with_opt_in_reports_labelled_uncertified_epsilon():
    mech = LMOMechanism(PAPER_DEFAULT, accept_uncertified_epsilon=True)
    rep = mech.epsilon(sample_rate=Q, steps=T, delta=DELTA)
    assert mech.certified is False and rep.certified is False
    assert rep.label == "as reported by LMO-DP, not certified" and "not certified" in str(rep)
    art = LMOMechanism(PAPER_DEFAULT, accept_uncertified_epsilon=True, mgf_domain="artifact")
    assert art.epsilon(sample_rate=Q, steps=T, delta=DELTA).details["eps_lmo"] == pytest.approx(
        0.29321, abs=5e-5)


def test_lmo_certified_accounting_needs_no_opt_in_and_is_larger():
    mech = LMOMechanism(PAPER_DEFAULT, accounting="certified")
    cert = mech.epsilon(sample_rate=Q, steps=T, delta=DELTA)
    rep = mech.reported_epsilon(sample_rate=Q, steps=T, delta=DELTA)
    assert mech.certified and cert.certified and not rep.certified
    assert math.isfinite(cert.epsilon) and cert.epsilon > 2 * rep.epsilon


def test_lmo_noise_std_matches_samples():
    mech = LMOMechanism(PAPER_DEFAULT, clip_norm=0.5, accounting="certified")
    z = 0.5 * lmo_noise_ref(100_000, PAPER_DEFAULT,
                            words=NoiseGenerator(secure=False, seed=3).kernel_words(0, STREAM_LMO))
    # E[z^2] estimate; heavy-ish tails, so allow 5 standard errors of the second moment.
    m2, se = float((z**2).mean()), float((z**2).std()) / math.sqrt(z.numel())
    assert abs(m2 - mech.noise_std()**2) < 5 * se


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mechanisms_add_exactly_what_they_sample(backend):
    device = kernel_devices()[0]
    for mech in (LMOMechanism(LMOParams(k=2.0), clip_norm=2.0, accounting="certified"),
                 GaussianMechanism(1.3, clip_norm=2.0)):
        g = torch.full((3, 41), 0.25, device=device)
        gen = NoiseGenerator(secure=False, seed=77)
        mech.add_noise_(g, generator=gen, step=9, offset=5, backend=backend)
        z = mech.sample(123, generator=gen, step=9, offset=5, device=device, backend=backend)
        torch.testing.assert_close(g.view(-1) - 0.25, z, rtol=1e-6, atol=1e-6)


def test_gaussian_noise_has_its_std_and_a_certified_epsilon():
    mech = GaussianMechanism(1.5, clip_norm=0.4)
    z = mech.sample(200_000, generator=NoiseGenerator(secure=False, seed=5), step=0,
                    backend="torch")
    assert float(z.mean()).__abs__() < 5 * 0.6 / math.sqrt(z.numel())
    assert float(z.std()) == pytest.approx(0.6, rel=0.01)
    rep = mech.epsilon(sample_rate=0.01, steps=1000, delta=1e-5)
    assert rep.certified and 0 < rep.epsilon < 10


@pytest.mark.parametrize("make,err,match", [
    (lambda: GaussianMechanism(0.0), ValueError, "noise_multiplier"),
    (lambda: GaussianMechanism(1.0, clip_norm=-1), ValueError, "clip_norm"),
    (lambda: LMOMechanism({"k": 1}, accounting="certified"), TypeError, "LMOParams"),
    (lambda: LMOMechanism(PAPER_DEFAULT, accounting="magic"), ValueError, "accounting"),
    (lambda: LMOMechanism(PAPER_DEFAULT, accounting="certified", mgf_domain="x"), ValueError,
     "mgf_domain"),
])
def test_mechanisms_reject_bad_arguments(make, err, match):
    with pytest.raises(err, match=match):
        make()
