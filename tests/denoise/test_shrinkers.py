"""Shrinkers against closed forms, the BBP round trip, and each other (independent formulas)."""
import math

import pytest
import torch

from dpkern.denoise.shrinkers import (SHRINKERS, bulk_edge, kappa_for_false_positive_rate,
                                      outlier_cosines, outlier_location, predicted_loss, shrink,
                                      shrink_noise_units, signal_estimate)

PHI = (1 + math.sqrt(5)) / 2


def test_closed_forms_square_beta1():
    # m = n = 1, sigma = 1: beta = 1, edge = 2. At y = 3 the signal is x = phi^2 (x + 1/x = 3).
    s = torch.tensor([3.0], dtype=torch.float64)
    x = PHI**2
    assert math.isclose(x + 1 / x, 3.0)
    torch.testing.assert_close(shrink(s, 1.0, 1, 1, "frobenius"), torch.tensor([math.sqrt(5.0)],
                               dtype=torch.float64))                   # sqrt((9-2)^2-4)/3
    torch.testing.assert_close(shrink(s, 1.0, 1, 1, "operator"), torch.tensor([x], dtype=torch.float64))
    nuc = (x**4 - 1 - x * 3) / (x * x * 3)
    torch.testing.assert_close(shrink(s, 1.0, 1, 1, "nuclear"), torch.tensor([nuc], dtype=torch.float64))
    torch.testing.assert_close(shrink(s, 1.0, 1, 1, "hard"), s)


def test_closed_form_rectangular():
    # beta = 1/4 (m=100, n=400), sigma = 0.5: y = s / (0.5 * 20); at y = 2: a = 4 - 1.25 = 2.75.
    s = torch.tensor([20.0], dtype=torch.float64)
    eta = math.sqrt(2.75**2 - 1.0) / 2.0 * 0.5 * 20
    torch.testing.assert_close(shrink(s, 0.5, 100, 400), torch.tensor([eta], dtype=torch.float64))
    torch.testing.assert_close(shrink(s, 0.5, 400, 100), torch.tensor([eta], dtype=torch.float64))
    assert bulk_edge(100, 400, 0.5) == pytest.approx(0.5 * 30)


@pytest.mark.parametrize("kind", SHRINKERS)
@pytest.mark.parametrize("mn", [(1, 1), (60, 63), (100, 400), (400, 100), (5, 3000)])
def test_zero_at_and_below_edge(kind, mn):
    m, n = mn
    edge = bulk_edge(m, n, 0.3)
    s = torch.tensor([0.0, 0.5 * edge, edge * (1 - 1e-9), edge], dtype=torch.float64)
    assert (shrink(s, 0.3, m, n, kind) == 0).all()
    above = torch.tensor([edge * 1.5, edge * 3], dtype=torch.float64)
    eta = shrink(above, 0.3, m, n, kind)
    assert (eta <= above + 1e-12).all()                    # every shrinker shrinks
    if kind != "nuclear":                                  # nuclear zeroes a bit above the edge too
        assert (eta > 0).all()


@pytest.mark.parametrize("kind", ["frobenius", "operator", "nuclear"])
def test_continuous_monotone_and_identity_far_out(kind):
    m, n = 50, 200
    edge = bulk_edge(m, n, 1.0)
    s = torch.linspace(edge, 40 * edge, 2001, dtype=torch.float64)
    eta = shrink(s, 1.0, m, n, kind)
    assert eta[0] == 0 and (eta.diff() >= 0).all()        # 0 at the edge, increasing
    if kind == "operator":  # jumps to the detection threshold x = beta^(1/4) (noise units)
        just_above = shrink(s[:1] * (1 + 1e-10), 1.0, m, n, kind)
        assert float(just_above) == pytest.approx((m / n) ** 0.25 * math.sqrt(n), rel=1e-3)
    else:                   # continuous: no jump just above the edge
        assert eta[1] < 0.2 * edge
    assert eta[-1] / s[-1] > 0.99                          # a strong signal passes almost as is


@pytest.mark.parametrize("mn", [(1, 1), (7, 9), (300, 600), (600, 300), (2048, 5504)])
def test_operator_equals_signal_estimate(mn):
    m, n = mn
    sigma = 0.02
    edge = bulk_edge(m, n, sigma)
    s = torch.linspace(0.5 * edge, 10 * edge, 97, dtype=torch.float64)
    # two formulas: noise-units inverse BBP map vs the theta-hat expression in singular-value units
    torch.testing.assert_close(shrink(s, sigma, m, n, "operator"), signal_estimate(s, sigma, m, n),
                               rtol=1e-10, atol=1e-12 * edge)


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.37, 0.05])
def test_bbp_round_trip(beta):
    # The operator shrinker inverts the outlier map: eta_op(y(x)) = x above the detection threshold.
    xs = torch.tensor([beta**0.25 * 1.01, 1.0, 2.0, 7.5], dtype=torch.float64)
    xs = xs[xs > beta**0.25]
    ys = torch.tensor([outlier_location(float(x), beta) for x in xs], dtype=torch.float64)
    assert (ys > 1 + math.sqrt(beta)).all()
    torch.testing.assert_close(shrink_noise_units(ys, beta, "operator"), xs, rtol=1e-9, atol=0)
    # Frobenius-optimal = x * c * c~ (Gavish & Donoho), from the cosines computed independently.
    cc = torch.tensor([math.prod(outlier_cosines(float(x), beta)) for x in xs], dtype=torch.float64)
    torch.testing.assert_close(shrink_noise_units(ys, beta, "frobenius"), xs * cc, rtol=1e-9, atol=0)
    assert outlier_location(beta**0.25 * 0.9, beta) == 1 + math.sqrt(beta)


@pytest.mark.parametrize("kind", SHRINKERS)
def test_homogeneous_in_scale(kind):
    s = torch.tensor([1.0, 30.0, 55.0, 90.0], dtype=torch.float64)
    a = shrink(s, 1.0, 300, 700, kind)
    b = shrink(s * 1e-4, 1e-4, 300, 700, kind)
    torch.testing.assert_close(b, a * 1e-4, rtol=1e-12, atol=0)


def test_kappa_threshold_and_false_positive_rate():
    s = torch.tensor([2.5], dtype=torch.float64)               # edge = 2 (m = n = 1)
    assert shrink(s, 1.0, 1, 1, "hard", kappa=1.2) > 0
    assert shrink(s, 1.0, 1, 1, "hard", kappa=1.3) == 0
    k = kappa_for_false_positive_rate(256, 512, 1e-9)
    assert k == pytest.approx(1 + math.sqrt(2 * math.log(1e9)) / (16 + math.sqrt(512)))


def test_predicted_loss_limits():
    # A very strong component is recovered almost exactly; one under the threshold is lost.
    assert predicted_loss([1e4], 0.5) < 2.0
    assert predicted_loss([0.5], 0.5) == pytest.approx(0.25)
    # Frobenius-optimal has the smallest Frobenius loss of all shrinkers.
    xs = [3.0, 1.5, 1.0]
    best = predicted_loss(xs, 0.5, "frobenius")
    assert all(best <= predicted_loss(xs, 0.5, k) + 1e-12 for k in ("operator", "nuclear", "hard"))


@pytest.mark.parametrize("bad", [
    dict(kind="spectral"), dict(sigma=0.0), dict(sigma=float("nan")), dict(m=0), dict(kappa=-1.0)])
def test_bad_arguments_name_the_argument(bad):
    args = dict(s=torch.ones(2), sigma=1.0, m=3, n=4, kind="frobenius", kappa=1.0) | bad
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        shrink(**args)
