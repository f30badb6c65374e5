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
  theorem (constant 0.4748 for identical steps, Shevtsova 2011; 0.5600 otherwise, Shevtsova 2010):
  e_Q = C * sum_t E|L_t - kappa_1|^3 / (sum_t Var L_t)^1.5. The third absolute moment gets a
  CERTIFIED upper bound and the variance a certified lower bound (``certified_step_moments``:
  L is increasing in x, so upper/lower Darboux-Stieltjes sums over ~10^5 cells with exact Q-masses,
  closed-form tails and explicit rounding allowances bound them; within 0.05% and 0.03% of the
  exact values). The Cauchy-Schwarz bound sqrt(kappa_2 * m_4) used before is kept as a cross-check
  (the smaller is used; it is 1.07-1.53x the certified one at sigma >= 0.3, e.g. 1.53x at
  sigma=1, q=0.01, where e_Q drops from 0.0417 to 0.0273 at T=10^4). So
      delta(eps) <= e_Q + [hockey stick of N(K1_Q, K2_Q) at eps].
  This uses the normal (zeroth-order Edgeworth) term with an explicit uniform error, not the
  paper's first-order remainder bound (Derumigny, Girard, Guyonvarch, Sankhya A 86 (2024),
  Theorem 2.1: O(1/sqrt(T)) from moments, O(1/T) under a characteristic-function condition).
  That bound is NOT implemented: its statement could not be checked against the paper's text,
  and the authors' R package, the only full source at hand, changed its constants between
  versions (README, "Gap", says what was found and what is missing). The bound only CONVERGES
  when delta > e_Q; below that it raises EdgeworthBoundError, which says how far off e_Q is and
  what delta or number of steps would converge.
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


# --- certified moments of one step's loss under Q -------------------------------------------
# E_Q|L - kappa_1|^3 (Berry-Esseen numerator), kappa_1 and Var_Q L are bounded from cells of a
# grid on [-_CELL_R, _CELL_R + mu]; see certified_step_moments.
_CELL_R = 40.0
_CELL_ZONES = ((6.0, 2.5e-4), (10.0, 2e-3))  # (distance from 0 or mu, spacing); 0.05 beyond
_CELL_COARSE = 0.05
_U = np.finfo(float).eps / 2  # unit roundoff
_LOSS_ERR = 1e-12  # per-point error allowance on computed L, >= 1000x the rounding analysis
_REL_MARGIN = 1e-9  # sums, exp/log of products, anything not covered per cell
_ABS_MARGIN = 1e-300  # terms that underflow (each < 2.3e-308; far fewer than 1e6 of them)


def _cell_grid(mu: float) -> np.ndarray:
    """Cell edges on [-R, R + mu]: spacing 2.5e-4 within 6 of 0 or mu, 2e-3 within 10, else 0.05.
    Any partition gives a valid bound; the spacing only sets how tight it is."""
    lo_end, hi_end = -_CELL_R, _CELL_R + mu
    h_min = _CELL_ZONES[0][1]
    cuts = sorted({lo_end, hi_end} | {c + s * w for c in (0.0, mu) for w, _ in _CELL_ZONES
                                      for s in (-1, 1)})
    kept = [lo_end]
    for v in cuts:
        if lo_end < v < hi_end and v - kept[-1] >= h_min:
            kept.append(v)
    if hi_end - kept[-1] < h_min and len(kept) > 1:
        kept.pop()
    kept.append(hi_end)
    pieces = [np.array([lo_end])]
    for u, v in zip(kept[:-1], kept[1:]):
        gap = min(max(0.0, u - c, c - v) for c in (0.0, mu))  # distance to the nearer centre
        h = next((hz for w, hz in _CELL_ZONES if gap < w), _CELL_COARSE)
        pieces.append(np.linspace(u, v, max(1, math.ceil((v - u) / h)) + 1)[1:])
    return np.concatenate(pieces)


def _log_normal_cells(y: np.ndarray, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(log N(0,1)-mass of each cell [y_i, y_{i+1}], its relative error allowance), where
    y = x - shift was computed in floating point from exact grid points x and shift = fl(1/sigma)
    (shift = 0: y exact), so each y is within 2u (|y| + shift) of the exact x - 1/sigma.

    Phi(b) - Phi(a) is formed on the lower tail (a + b < 0) or, as Phi(-a) - Phi(-b), on the upper
    one, as Phi(hi) * (1 - exp(d)) with d = log Phi(lo) - log Phi(hi) < 0 from log_ndtr. Each log
    value l = log Phi(v) is within e_v = 32u (1 + |l|) (log_ndtr's error, checked against mpmath
    in the tests at 16u) + (|v| + 1) * 2u (|v| + shift) (the argument's error times the slope
    phi/Phi <= |v| + 1); d log(-expm1(d)) / dd <= 1/|d|; so the mass is within
    2 (e_lo + e_hi + 3u) (1 + 1/|d|) relative, with room for the last few roundings.
    """
    a, b = y[:-1], y[1:]
    upper = a + b > 0
    lo = np.where(upper, -b, a)
    hi = np.where(upper, -a, b)
    l_lo, l_hi = special.log_ndtr(lo), special.log_ndtr(hi)
    d = l_lo - l_hi
    if not np.all(d < 0):  # cells are >= 1.2e-4 wide: cannot happen for |y| < 1e10
        raise RuntimeError("degenerate cell in the Edgeworth moment bound")
    e_lo, e_hi = ((32 * _U * (1 + np.abs(l)) + (np.abs(v) + 1) * 2 * _U * (np.abs(v) + shift))
                  for l, v in ((l_lo, lo), (l_hi, hi)))
    return l_hi + np.log(-np.expm1(d)), 2 * (e_lo + e_hi + 3 * _U) * (1 + 1 / -d)


def _loss_and_error(x: np.ndarray, mu: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(L(x) as computed, bound on |computed - exact|) for the exact mu = 1/sigma.

    t = mu x - mu^2/2 is within 4u (mu|x| + mu^2) of exact (including mu = fl(1/sigma)); dL/dt
    <= min(1, q e^t / (1 - q)); log1p(q expm1(t)) (q <= 1/2, t <= 700) is within 8u|L| of the
    loss at the computed t, and logaddexp within 4u (|L| + |log q + t| + |log(1 - q)|). The
    allowance _LOSS_ERR (|L| + slope bound * (mu|x| + mu^2 + extra)) is 1000x beyond that."""
    t = mu * x - mu * mu / 2
    k = mu * np.abs(x) + mu * mu
    if q == 1.0:
        loss = t
    elif q <= 0.5:
        big = t > 700
        loss = np.where(big, np.logaddexp(math.log1p(-q), math.log(q) + t),
                        np.log1p(q * np.expm1(np.minimum(t, 700))))
        k = np.minimum(1.0, 2 * q * np.exp(np.minimum(t + 1, 700))) * (
            k + np.where(big, abs(math.log(q)), 0.0))
    else:
        loss = np.logaddexp(math.log1p(-q), math.log(q) + t)
        k = k + abs(math.log(q)) + abs(math.log1p(-q))
    return loss, _LOSS_ERR * (np.abs(loss) + k)


def _normal_tail(r: float, mu: float, b: float, power: int) -> float:
    """Upper bound on 2 * int_r^inf (b + mu z)^power phi(z) dz (power 1 or 3), from
    int_r^inf z^j phi = phi(r) * (1/r, 1, r + 1/r, r^2 + 2)[j] (upper bounds for j = 0, 2)."""
    j = (1 / r, 1.0, r + 1 / r, r * r + 2)
    poly = sum(math.comb(power, i) * b ** (power - i) * mu ** i * j[i] for i in range(power + 1))
    return 2 * math.exp(-r * r / 2 - 0.5 * math.log(2 * math.pi) + math.log(poly))


@lru_cache(maxsize=256)
def certified_step_moments(sigma: float, q: float) -> tuple[float, float, float, float]:
    """(mean_lo, mean_hi, var_lo, abs3_hi) with mean_lo <= E_Q L <= mean_hi, var_lo <= Var_Q L
    and E_Q|L - E_Q L|^3 <= abs3_hi for one step's privacy loss: certified, not estimated.

    L is increasing in x, so on a cell [a, b] it lies between L(a) and L(b), and |L - c| is at
    most max(|L(a) - c|, |L(b) - c|) (the root of L = c need not be a grid point) and at least
    min of the two unless they straddle c (then 0). Each cell's Q-mass is exact up to rounding
    ((1-q) and q times normal-cell masses from log_ndtr, each with a stated relative error).
    Upper (lower) Darboux-Stieltjes sums over 5*10^4 - 10^5 cells then bound the integrals; beyond
    [-R, R + mu] (R = 40), |L(x)| <= mu|x| + mu^2/2 and the Q density is below phi(x) (left) or
    phi(x - mu) (right), which closed-form normal tail moments bound. E_Q L is bracketed first
    ([lo, hi], from the same cells), c = its midpoint, dm = half-width; then pointwise
    |L - E L| <= |L - c| + dm and Var L >= E(L - c)^2 - dm^2. Rounding: each computed L carries
    an error allowance (_loss_and_error), each mass its own, and the result a further relative
    1e-9 (sums, exp/log of products) and absolute 1e-300 (terms that underflow). The grid
    spacing (2.5e-4 near 0 and mu) keeps abs3_hi within ~0.1% of the exact value (tested
    against adaptive quadrature), ~10 ms per (sigma, q).
    """
    mu = 1.0 / sigma
    x = _cell_grid(mu)
    l1, r1 = _log_normal_cells(x - mu, mu)
    if q == 1.0:
        log_mass, rel = l1, r1
    else:  # mixture: its error is the mass-weighted sum of the components' errors
        l0, r0 = _log_normal_cells(x, 0.0)
        l0, l1 = math.log1p(-q) + l0, math.log(q) + l1
        log_mass = np.logaddexp(l0, l1)
        rel = np.exp(l0 - log_mass) * r0 + np.exp(l1 - log_mass) * r1
    rel = rel + _REL_MARGIN
    m_up = np.exp(log_mass) * (1 + rel)
    m_lo = np.exp(log_mass) * np.maximum(0.0, 1 - rel)
    loss, err = _loss_and_error(x, mu, q)
    la, lb = loss[:-1], loss[1:]
    ea, eb = err[:-1], err[1:]

    # E_Q L: L(a) - err <= L <= L(b) + err on a cell; tails |int L dQ| <= _normal_tail(.., 1)
    tail1 = _normal_tail(_CELL_R, mu, 1.5 * mu * mu, 1)
    pos_lo, pos_hi = la - ea, lb + eb
    lo = float(np.sum(np.where(pos_lo > 0, m_lo, m_up) * pos_lo)) - tail1
    hi = float(np.sum(np.where(pos_hi > 0, m_up, m_lo) * pos_hi)) + tail1
    slack = _REL_MARGIN * (float(np.dot(m_up, np.maximum(np.abs(la), np.abs(lb)) + eb + ea))
                           + tail1) + _ABS_MARGIN
    lo, hi = lo - slack, hi + slack
    c = 0.5 * (lo + hi)
    dm = max(hi - c, c - lo) * (1 + _REL_MARGIN)

    # cell-wise bounds on |L - c| (computed minus/plus allowances, incl. rounding of L - c)
    da, db = la - c, lb - c
    e_cell = np.maximum(ea, eb) + 4 * _U * (np.abs(c) + np.maximum(np.abs(la), np.abs(lb)))
    f_up = np.maximum(np.abs(da), np.abs(db)) + e_cell + dm
    f_lo = np.where(da * db <= 0, 0.0,
                    np.maximum(0.0, np.minimum(np.abs(da), np.abs(db)) - e_cell))
    with np.errstate(divide="ignore"):
        terms3 = np.exp(log_mass + np.log1p(rel) + 3 * np.log(f_up))
    tail3 = _normal_tail(_CELL_R, mu, 1.5 * mu * mu + max(abs(lo), abs(hi)), 3)
    abs3 = (float(np.sum(terms3)) + tail3) * (1 + _REL_MARGIN) + _ABS_MARGIN
    var = float(np.dot(m_lo, f_lo * f_lo)) * (1 - _REL_MARGIN) - dm * dm
    return lo, hi, var, abs3


def step_third_moment_bound(sigma: float, q: float) -> float:
    """Upper bound on E_Q|L - kappa_1|^3 for one step (the Berry-Esseen numerator): the certified
    bound of ``certified_step_moments``, or the Cauchy-Schwarz value sqrt(kappa_2 * m_4) from the
    Gauss-Hermite moments where that is smaller (both bound it). In every case tested the
    certified one is smaller: 1.07-1.53x at sigma >= 0.3, down to 1.000002x at sigma=0.001,
    q=0.5, where the loss is nearly two-valued and Cauchy-Schwarz nearly tight."""
    _, kq, m4 = step_cumulants(sigma, q)
    return min(certified_step_moments(sigma, q)[3], math.sqrt(kq[1] * m4))


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
            var += n * certified_step_moments(s, q)[2]  # <= n * Var L
            rho += n * step_third_moment_bound(s, q)  # >= n * E|L - kappa_1|^3
        c = BERRY_ESSEEN_IID if len(groups) == 1 else BERRY_ESSEEN_NON_IID
        return c * rho / var ** 1.5 if var > 0 else math.inf  # var <= 0: no certified variance

    def berry_esseen_error(self) -> float:
        """e_Q: sup_x |F_Q(x) - Phi((x - K1_Q) / sqrt(K2_Q))| is at most this."""
        return min(1.0, self._berry_esseen_raw())

    def _refusal(self, delta: float) -> EdgeworthBoundError:
        """The error saying which condition failed (e_Q < delta) and what would satisfy it."""
        raw, err = self._berry_esseen_raw(), self.berry_esseen_error()
        steps = sum(n for _, _, n in self._groups() or [])
        # repeating the history k times divides e_Q by sqrt(k); strict inequality: one step more
        need = math.floor(steps * (raw / delta) ** 2) + 1 if math.isfinite(raw) else math.inf
        where = (f"any delta > {err:.4g} at these {steps} steps, or at delta={delta:g} about "
                 f"{need:.3g} steps of the same (sigma, q) mix" if err < 1.0 else
                 f"no delta < 1 at these {steps} steps; at delta={delta:g} about {need:.3g} "
                 "steps of the same (sigma, q) mix")
        return EdgeworthBoundError(
            f"the rigorous Edgeworth bound does not converge at delta={delta:g}: it needs its "
            f"uniform CDF error e_Q < delta, and e_Q = {err:.4g} (Berry-Esseen, shrinks like "
            f"1/sqrt(steps)). It would converge for {where}. The paper's finite-sample "
            "first-order bound (Derumigny et al. 2024, Theorem 2.1) is not implemented: its "
            "constants could not be checked against the paper (dpkern/accounting/README.md, "
            "'Gap'). Use PRVAccountant for a tight bound, or get_epsilon_estimate() for an "
            "estimate (not a bound).",
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
