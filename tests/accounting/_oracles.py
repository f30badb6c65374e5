"""Independent oracles for the accounting tests, computed live from dp_accounting and Opacus."""
import math
import warnings

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as pld
from opacus.accountants import PRVAccountant as OpacusPRV
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy import integrate, optimize, special


def dpa_rdp(sigma, q, steps, delta, orders):
    acc = dp_accounting.rdp.RdpAccountant(orders=list(orders))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def opacus_rdp_eps(history, delta, orders):
    rdp = sum(opacus_rdp.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=list(orders))
              for s, q, n in history)
    return opacus_rdp.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)[0]


def dpa_pld(history, delta, interval):
    """dp_accounting's own PLD accountant on a fine grid (an upper bound converged from above)."""
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
    for s, q, n in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
    return acc.get_epsilon(delta)


def opacus_prv_bounds(history, delta, eps_error=0.02):
    """(eps_lower, eps_estimate, eps_upper) of Opacus's PRV accountant (Gopi et al. 2021)."""
    acc = OpacusPRV()
    acc.history = list(history)
    delta_error = delta / 1000
    return acc._get_dprv(eps_error=eps_error, delta_error=delta_error).compute_epsilon(
        delta, delta_error, eps_error)


def exact_gaussian_eps(sigma, steps, delta):
    """Exact eps of `steps` full-batch (q=1) Gaussian steps: mu-GDP with mu = sqrt(T)/sigma."""
    mu = math.sqrt(steps) / sigma

    def d(e):
        return (math.exp(special.log_ndtr(-e / mu + mu / 2))
                - math.exp(e + special.log_ndtr(-e / mu - mu / 2)))
    if d(0.0) <= delta:
        return 0.0
    hi = 1.0
    while d(hi) > delta:
        hi *= 2
    return optimize.brentq(lambda e: d(e) - delta, 0.0, hi, xtol=1e-13, rtol=1e-14)


def pld_single(sigma, q, steps, delta, interval):
    return pld.from_gaussian_mechanism(sigma, sampling_prob=q, value_discretization_interval=interval
                                       ).self_compose(steps).get_epsilon_for_delta(delta)


def quad_rdp(q, sigma, order):
    """RDP of one subsampled-Gaussian step by adaptive quadrature of its defining integral,
    A - 1 = E_{z~N(0,s^2)}[(1 + q (e^{(2z-1)/(2s^2)} - 1))^order - 1], kept small for precision."""
    s2 = sigma * sigma

    def f(z):
        x = q * math.expm1((2 * z - 1) / (2 * s2))
        return (math.exp(-z * z / (2 * s2)) / (sigma * math.sqrt(2 * math.pi))
                * math.expm1(order * math.log1p(x)))
    lo, hi = -40 * sigma, 40 * sigma + order + 2
    split = [p for p in (0.5, s2 * math.log(1 / q - 1) + 0.5) if lo < p < hi]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        a_minus_1 = integrate.quad(f, lo, hi, points=sorted(split), limit=500, epsabs=1e-20,
                                   epsrel=1e-13)[0]
    return math.log1p(a_minus_1) / (order - 1)
