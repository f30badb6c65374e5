"""Edgeworth accountant (Wang et al. 2022, "Analytical composition of DP via the Edgeworth
accountant"; used for calibration in EW-Tune, Behnia et al. 2022).

One step, mu = 1/sigma: P = N(0,1), Q = (1-q) N(0,1) + q N(mu,1), privacy loss
L(x) = log(1 - q + q e^{mu x - mu^2/2}). Cumulants kappa_1..4 of L under P and under Q come from
Gauss-Hermite quadrature; T steps add them (K_j = sum_t kappa_j). Then

    delta(eps) = (1 - F_Q(eps)) - e^eps (1 - F_P(eps))

with F_P, F_Q the CDFs of the summed loss. Two answers, never confused:

* ESTIMATE (``get_epsilon_estimate``): F_P, F_Q replaced by their first-order (default, as in
  EW-Tune) or second-order Edgeworth expansions. Often close, but NOT conservative: at
  q=2000/67349, T=660, delta=1e-5 the first-order estimate calibrates sigma=0.786 for eps=8, and
  the tight PLD accountant says that sigma spends eps=8.30.
* BOUND (``get_epsilon_bound`` = ``get_epsilon``): rigorous. delta(eps) is written with F_Q only,
  delta(eps) = int_eps^inf e^{eps-l} (1 - F_Q(l)) dl, and |F_Q - Phi| <= e_Q by the Berry-Esseen
  theorem (constant 0.4748 for identical steps, Shevtsova 2011; 0.5600 otherwise, Shevtsova 2010),
  with E|L - kappa_1|^3 <= sqrt(kappa_2 * m_4) (Cauchy-Schwarz). So
      delta(eps) <= e_Q + [hockey stick of N(K1_Q, K2_Q) at eps].
  This uses the normal (zeroth-order Edgeworth) term with an explicit uniform error, not the
  paper's first-order remainder bound (Derumigny et al.: O(1/sqrt(T)) from moments, O(1/T) only
  under a characteristic-function condition we have not certified; see README, "Gap"). The bound
  only CONVERGES when delta > e_Q; below that it raises EdgeworthBoundError, which says how far
  off e_Q is and what delta or number of steps would converge.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import optimize, special

from dpkern.accounting._base import Accountant, check_delta

BERRY_ESSEEN_IID = 0.4748
BERRY_ESSEEN_NON_IID = 0.5600
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(240)
_GH_W = _GH_W / math.sqrt(2 * math.pi)  # weights of E[f(Z)], Z ~ N(0, 1)


class EdgeworthBoundError(ValueError):
    """The rigorous Edgeworth bound does not reach the requested delta.

    Attributes: ``delta`` (asked for), ``error`` (e_Q, the bound's uniform CDF error; it needs
    e_Q < delta), ``steps`` (steps recorded) and ``steps_needed`` (the same history repeated
    until e_Q < delta: e_Q scales exactly like 1/sqrt(repetitions)); inf where e_Q >= 1.
    """

    def __init__(self, message: str, *, delta: float = math.nan, error: float = math.nan,
                 steps: int = 0, steps_needed: float = math.nan) -> None:
        super().__init__(message)
        self.delta, self.error, self.steps, self.steps_needed = delta, error, steps, steps_needed


def _loss(x: np.ndarray, mu: float, q: float) -> np.ndarray:
    if q == 1.0:
        return mu * x - mu * mu / 2
    return np.logaddexp(math.log1p(-q), math.log(q) + mu * x - mu * mu / 2)


@lru_cache(maxsize=256)
def step_cumulants(sigma: float, q: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(kappa_P[1..4], kappa_Q[1..4], m4_Q) of one step's privacy loss; m4_Q is the central
    4th moment under Q (for the Berry-Esseen third-moment bound)."""
    mu = 1.0 / sigma
    lp = _loss(_GH_X, mu, q)
    lq = _loss(_GH_X + mu, mu, q)

    def central(values_weights):
        mean = sum(float(np.dot(w, v)) for v, w in values_weights)
        cm = [sum(float(np.dot(w, (v - mean) ** k)) for v, w in values_weights) for k in (2, 3, 4)]
        return mean, cm

    m_p, (c2p, c3p, c4p) = central([(lp, _GH_W)])
    m_q, (c2q, c3q, c4q) = central([(lp, (1 - q) * _GH_W), (lq, q * _GH_W)])
    kp = np.array([m_p, c2p, c3p, c4p - 3 * c2p ** 2])
    kq = np.array([m_q, c2q, c3q, c4q - 3 * c2q ** 2])
    return kp, kq, c4q


def _edgeworth_sf(x: float, k: np.ndarray, order: int) -> float:
    """1 - F(x) for a sum with cumulants k = (K1, K2, K3, K4), Edgeworth expansion of this order."""
    s = math.sqrt(k[1])
    z = (x - k[0]) / s
    l3, l4 = k[2] / s ** 3, k[3] / s ** 4
    corr = l3 / 6 * (z * z - 1)
    if order >= 2:
        corr += l4 / 24 * (z ** 3 - 3 * z) + l3 * l3 / 72 * (z ** 5 - 10 * z ** 3 + 15 * z)
    pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return float(special.ndtr(-z) + pdf * corr)


def _normal_hockey_stick(eps: float, m: float, s: float) -> float:
    """E[(1 - e^{eps - L})_+] for L ~ N(m, s^2), in log space."""
    z = (eps - m) / s
    a = special.log_ndtr(-z)
    b = eps - m + s * s / 2 + special.log_ndtr(-z - s)
    return math.exp(a) * -math.expm1(b - a) if b < a else 0.0


def _smallest_eps(delta_of_eps, delta: float, scale: float) -> float:
    """Smallest eps >= 0 with delta_of_eps(e) <= delta for all e on a grid beyond it (bisection
    inside the last crossing)."""
    if delta_of_eps(0.0) <= delta:
        return 0.0
    grid = np.linspace(0.0, scale, 801)
    vals = np.array([delta_of_eps(e) for e in grid])
    bad = np.nonzero(vals > delta)[0]
    if bad[-1] == len(grid) - 1:
        raise EdgeworthBoundError("delta(eps) never falls below delta on the search range")
    lo, hi = grid[bad[-1]], grid[bad[-1] + 1]
    return float(optimize.brentq(lambda e: delta_of_eps(e) - delta, lo, hi, xtol=1e-10))


class EdgeworthAccountant(Accountant):
    """Edgeworth accountant: an estimate (not conservative) and a rigorous bound (often refuses).

    ``get_epsilon`` returns the bound, so a printed epsilon is never optimistic; it raises
    :class:`EdgeworthBoundError` (a ValueError) where the bound does not converge.

    Example::

        acc = EdgeworthAccountant()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10_000)
        acc.get_epsilon_estimate(1e-5)     # 6.38, an estimate only (tight: 6.19)
        acc.get_epsilon_bound(0.1)         # rigorous, converges since delta > e_Q
    """

    mechanism = "edgeworth"

    def __init__(self, order: int = 1) -> None:
        super().__init__()
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        self.order = order

    def _config(self):
        return {"order": self.order}

    def cumulants(self) -> tuple[np.ndarray, np.ndarray]:
        """(K_P, K_Q): the first four cumulants of the summed privacy loss under P and under Q."""
        groups = self._groups() or []
        kp, kq = np.zeros(4), np.zeros(4)
        for s, q, n in groups:
            p1, q1, _ = step_cumulants(s, q)
            kp, kq = kp + n * p1, kq + n * q1
        return kp, kq

    def _berry_esseen_raw(self) -> float:
        """C * sum E|L - kappa_1|^3 / (sum Var L)^1.5 before clamping to 1 (0 if nothing spent)."""
        groups = self._groups() or []
        if not groups:
            return 0.0
        var = rho = 0.0
        for s, q, n in groups:
            _, kq, m4 = step_cumulants(s, q)
            var += n * kq[1]
            rho += n * math.sqrt(kq[1] * m4)  # >= n * E|L - kappa_1|^3
        c = BERRY_ESSEEN_IID if len(groups) == 1 else BERRY_ESSEEN_NON_IID
        return c * rho / var ** 1.5

    def berry_esseen_error(self) -> float:
        """e_Q: sup_x |F_Q(x) - Phi((x - K1_Q) / sqrt(K2_Q))| is at most this."""
        return min(1.0, self._berry_esseen_raw())

    def _refusal(self, delta: float) -> EdgeworthBoundError:
        """The error saying which condition failed (e_Q < delta) and what would satisfy it."""
        raw, err = self._berry_esseen_raw(), self.berry_esseen_error()
        steps = sum(n for _, _, n in self._groups() or [])
        # repeating the history k times divides e_Q by sqrt(k); strict inequality: one step more
        need = math.floor(steps * (raw / delta) ** 2) + 1
        where = (f"any delta > {err:.4g} at these {steps} steps, or at delta={delta:g} about "
                 f"{need:.3g} steps of the same (sigma, q) mix" if err < 1.0 else
                 f"no delta < 1 at these {steps} steps; at delta={delta:g} about {need:.3g} "
                 "steps of the same (sigma, q) mix")
        return EdgeworthBoundError(
            f"the rigorous Edgeworth bound does not converge at delta={delta:g}: it needs its "
            f"uniform CDF error e_Q < delta, and e_Q = {err:.4g} (Berry-Esseen, shrinks like "
            f"1/sqrt(steps)). It would converge for {where}. Use PRVAccountant for a tight "
            "bound, or get_epsilon_estimate() for an estimate (not a bound).",
            delta=delta, error=err, steps=steps, steps_needed=float(need))

    def _special(self, delta: float) -> float | None:
        delta = check_delta(delta)
        groups = self._groups()
        return math.inf if groups is None else (0.0 if not groups else None)

    def _scale(self, kq: np.ndarray) -> float:
        return float(abs(kq[0]) + 40 * math.sqrt(kq[1]) + 10)

    def get_epsilon_estimate(self, delta: float, order: int | None = None) -> float:
        """Edgeworth point estimate (``order`` 1 or 2, default ``self.order``). NOT a bound."""
        order = self.order if order is None else order
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        special_value = self._special(delta)
        if special_value is not None:
            return special_value
        kp, kq = self.cumulants()

        def d(e):
            return _edgeworth_sf(e, kq, order) - math.exp(e) * _edgeworth_sf(e, kp, order)
        return _smallest_eps(d, delta, self._scale(kq))

    def get_epsilon_bound(self, delta: float) -> float:
        """Rigorous upper bound on epsilon; raises EdgeworthBoundError where it does not converge."""
        special_value = self._special(delta)
        if special_value is not None:
            return special_value
        _, kq = self.cumulants()
        err = self.berry_esseen_error()
        if err >= delta:
            raise self._refusal(delta)
        s = math.sqrt(kq[1])
        return _smallest_eps(lambda e: err + _normal_hockey_stick(e, kq[0], s), delta,
                             self._scale(kq))

    def get_epsilon(self, delta: float) -> float:
        """The rigorous bound (see ``get_epsilon_bound``); never the estimate."""
        return self.get_epsilon_bound(delta)

    def _epsilon(self, groups, delta):  # pragma: no cover - get_epsilon is overridden
        return self.get_epsilon_bound(delta)

    def report(self, delta: float) -> dict:
        """Both numbers, labelled: {'estimate_order1', 'estimate_order2': float (estimates, not
        bounds), 'bound': float | None (rigorous), 'bound_error': why the bound is None}."""
        out = {"estimate_order1": self.get_epsilon_estimate(delta, order=1),
               "estimate_order2": self.get_epsilon_estimate(delta, order=2),
               "bound": None, "bound_error": ""}
        try:
            out["bound"] = self.get_epsilon_bound(delta)
        except EdgeworthBoundError as exc:
            out["bound_error"] = str(exc)
        return out
