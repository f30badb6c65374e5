"""LMO-DP accounting: the paper's ("reported", NOT certified) epsilon, and a certified upper bound.

Reported (what LMO-DP states, reproduced faithfully):
  1. per-step RDP of the ONE-dimensional mechanism x + Laplace(0, 1/u), sensitivity 1, at orders
     alpha = 2..128, from the MGF M of u:
         eps(alpha) = 1/(alpha-1) * log[(alpha M(alpha-1) + (alpha-1) M(-alpha)) / (2 alpha - 1)]
  2. one-step (eps_lmo, delta) by the RDP -> DP conversion of Balle et al. 2020;
  3. sigma_eq = sqrt(2 ln(1.25/delta)) / eps_lmo, the Gaussian with the "same" one-step (eps, delta);
  4. that Gaussian composed over Poisson-subsampled steps by dpkern.accounting.
Steps 1 treats a d-dimensional L2-clipped gradient as if it had sensitivity 1 per coordinate set,
and steps 3-4 swap the mechanism for a different one before composing: neither is a valid DP
argument in general (README.md in this folder says why). The result is labelled
"as reported by LMO-DP, not certified".

MGF domain. M(t) exists only for a1*theta*t < 1 and a3*t < lam. ``mgf_domain="strict"`` (default)
drops the orders where M(alpha-1) is undefined, as the paper's formula requires. The artifact does
not: it evaluates the closed forms outside their domain, where the Gamma and Exponential factors are
both negative and their product is positive by accident; those orders (alpha >= 52 for the default
configuration) are what produce its eps_lmo = 0.293. ``mgf_domain="artifact"`` reproduces that
number; on the valid orders the same formula gives 1.31.

Certified: an upper bound on the RDP of the d-dimensional mechanism actually run. Coordinates are
independent, so the Renyi divergence is the sum over coordinates; by joint convexity each coordinate
with shift D_i contributes at most f_alpha(|D_i|) (step 1's formula with M(t) -> M(t |D_i|)); with
sum D_i^2 <= 1 (clip norm 1) the total is at most rho(alpha) = sup_{0<D<=1} f_alpha(D) / D^2, for every
d (and close to attained once d >= 1/D*^2). Poisson subsampling is then handled by the general
subsampled-RDP bound of Zhu & Wang 2019 (Thm. 6), composed additively over steps, and converted with
the same Balle et al. conversion. No Gaussian substitution anywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, logsumexp

from dpkern.mechanisms.lmo_params import LMOParams

#: The paper's orders, 2..128.
PAPER_ORDERS = np.arange(2, 129, dtype=np.float64)
REPORTED_LABEL = "as reported by LMO-DP, not certified"
MGF_DOMAINS = ("strict", "artifact")


def _log_uniform_mgf(x):
    """log((e^x - 1) / x) for x = a4 t (b - a); 0 at x = 0, stable for |x| small or large."""
    x = np.asarray(x, dtype=np.float64)
    small = np.abs(x) < 1e-6
    big = x > 50
    safe = np.where(small | big, 1.0, x)
    mid = np.log(np.expm1(safe) / safe)
    return np.where(small, x / 2 + x * x / 24, np.where(big, x - np.log(np.where(big, x, 1.0)), mid))


def log_mgf(p: LMOParams, t) -> np.ndarray:
    """log E[exp(t u)] for u = a1 Gamma(k, theta) + a3 Exp(lam) + a4 U(a, b); NaN where undefined.

    Args: t: scalar or array (float64). Returns: array of t's shape.
    """
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = 1.0 - p.a1 * p.theta * t
        e = 1.0 - p.a3 * t / p.lam
        ok = (g > 0) & (e > 0)
        out = (-p.k * np.log(np.where(ok, g, 1.0)) - np.log(np.where(ok, e, 1.0))
               + p.a4 * t * p.a + _log_uniform_mgf(p.a4 * t * (p.b - p.a)))
    return np.where(ok, out, np.nan)


def _artifact_mgf(p: LMOParams, t) -> np.ndarray:
    """M(t) evaluated the way the LMO-DP artifact does: closed forms even outside their domain."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(all="ignore"):
        gam = np.power(1.0 - p.a1 * t * p.theta, -p.k)
        exp = p.lam / (p.lam - p.a3 * t)
        s = p.a4 * t
        uni = (np.exp(s * p.b) - np.exp(s * p.a)) / (s * (p.b - p.a))
        return gam * exp * uni


def _check_orders(orders) -> np.ndarray:
    o = np.asarray(orders, dtype=np.float64).reshape(-1)
    if o.size == 0 or not np.all(o > 1) or not np.all(np.isfinite(o)):
        raise ValueError(f"orders must be a non-empty list of finite numbers > 1, got {orders!r}")
    return o


def coordinate_rdp(p: LMOParams, orders=PAPER_ORDERS, shift: float = 1.0) -> np.ndarray:
    """RDP f_alpha(shift) of one coordinate x + Laplace(0, 1/u) whose value moves by ``shift``.

    This is the paper's per-step formula (shift = 1), a valid bound for a SCALAR query with
    sensitivity ``shift`` (joint convexity over the mixing variable u). Orders where the MGF is
    undefined give +inf (dropped). Returns (len(orders),) float64. (The search passes ``p`` with
    (n, 1) array fields and gets (n, len(orders)).)
    """
    o = _check_orders(orders)
    shift = float(shift)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    l1 = log_mgf(p, (o - 1) * shift)
    l2 = log_mgf(p, -o * shift)
    with np.errstate(over="ignore", invalid="ignore"):
        inner = (o * np.expm1(l1) + (o - 1) * np.expm1(l2)) / (2 * o - 1)
        f = np.log1p(inner) / (o - 1)
    return np.where(np.isfinite(f), np.maximum(f, 0.0), np.inf)


def lmo_rdp(p: LMOParams, orders=PAPER_ORDERS, *, mgf_domain: str = "strict") -> np.ndarray:
    """The paper's per-step RDP (sensitivity 1) at each order; +inf marks a dropped order.

    ``mgf_domain``: "strict" drops orders where M(alpha - 1) is undefined; "artifact" evaluates the
    closed forms everywhere, as the LMO-DP artifact does (see module doc), and drops only orders
    where the result is not a positive number.
    """
    if mgf_domain not in MGF_DOMAINS:
        raise ValueError(f"mgf_domain must be one of {MGF_DOMAINS}, got {mgf_domain!r}")
    o = _check_orders(orders)
    if mgf_domain == "strict":
        return coordinate_rdp(p, o, 1.0)
    # The artifact's own (partial) parameter check: it tests only the smallest order.
    passes = (np.asarray(p.a1 * p.theta) < 1) & (np.asarray(p.a3) < p.lam)
    with np.errstate(all="ignore"):
        r = np.log((o * _artifact_mgf(p, o - 1) + (o - 1) * _artifact_mgf(p, -o)) / (2 * o - 1))
        r = r / (o - 1)
    return np.where(np.isfinite(r) & (r > 0) & passes, r, np.inf)


def rdp_to_epsilon(orders, rdp, delta: float) -> tuple[float, float]:
    """(eps, best order) from RDP values by Balle et al. 2020, Thm. 21 (as the artifact does):
    eps = min_alpha rdp(alpha) + log((alpha-1)/alpha) - (log delta + log alpha) / (alpha - 1).
    Returns (inf, nan) when every order is +inf."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    o = _check_orders(orders)
    r = np.asarray(rdp, dtype=np.float64).reshape(-1)
    if r.shape != o.shape:
        raise ValueError(f"rdp has {r.size} values for {o.size} orders")
    eps = r + np.log((o - 1) / o) - (math.log(delta) + np.log(o)) / (o - 1)
    eps = np.where(np.isfinite(eps), np.maximum(eps, 0.0), np.inf)
    i = int(np.argmin(eps))
    return (float(eps[i]), float(o[i])) if np.isfinite(eps[i]) else (math.inf, math.nan)


def lmo_epsilon(p: LMOParams, delta: float, *, orders=PAPER_ORDERS,
                mgf_domain: str = "strict") -> tuple[float, float]:
    """One-step (eps_lmo, best order) of the paper's accountant. Known check: the default params
    at delta = 1e-10 give 0.2932 with mgf_domain="artifact" and 1.308 with "strict"."""
    o = _check_orders(orders)
    return rdp_to_epsilon(o, lmo_rdp(p, o, mgf_domain=mgf_domain), delta)


def sigma_equivalent(eps_lmo: float, delta: float) -> float:
    """The paper's sigma_eq = sqrt(2 ln(1.25/delta)) / eps_lmo (Dwork-Roth's Gaussian calibration,
    which is itself only proven for eps < 1), in units of the clip norm."""
    if not eps_lmo > 0:
        raise ValueError(f"eps_lmo must be > 0, got {eps_lmo!r}")
    return math.sqrt(2 * math.log(1.25 / delta)) / eps_lmo


@dataclass(frozen=True)
class EpsilonReport:
    """An epsilon and what it means. ``certified`` is False for LMO-DP's reported value."""

    epsilon: float
    delta: float
    certified: bool
    label: str
    details: dict

    def __float__(self) -> float:
        return float(self.epsilon)

    def __str__(self) -> str:
        return f"epsilon = {self.epsilon:.4g} at delta = {self.delta:g} ({self.label})"


def reported_epsilon(p: LMOParams, *, sample_rate: float, steps: int, delta: float,
                     mgf_domain: str = "strict", accountant: str = "rdp") -> EpsilonReport:
    """LMO-DP's training epsilon: sigma_eq from the one-step eps_lmo, then the Poisson-subsampled
    Gaussian with sigma_eq composed over ``steps`` by dpkern.accounting ("rdp" at orders 2..128,
    as the artifact, or "prv"). NOT a certified guarantee (certified=False)."""
    eps_lmo, order = lmo_epsilon(p, delta, mgf_domain=mgf_domain)
    if not math.isfinite(eps_lmo):
        raise ValueError(f"LMO params {p} have no finite eps_lmo at delta={delta} "
                         f"(every order's MGF is undefined, mgf_domain={mgf_domain!r})")
    sigma = sigma_equivalent(eps_lmo, delta)
    if accountant == "rdp":
        from dpkern.accounting.rdp import RDPAccountant
        acc = RDPAccountant(orders=PAPER_ORDERS.tolist())
    elif accountant == "prv":
        from dpkern.accounting.prv import PRVAccountant
        acc = PRVAccountant()
    else:
        raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")
    acc.step(noise_multiplier=sigma, sample_rate=sample_rate, num_steps=steps)
    eps = acc.get_epsilon(delta)
    return EpsilonReport(eps, delta, False, REPORTED_LABEL,
                         {"eps_lmo": eps_lmo, "order": order, "sigma_eq": sigma,
                          "mgf_domain": mgf_domain, "accountant": accountant,
                          "sample_rate": sample_rate, "steps": steps})


# ----------------------------------------------------------------------------- certified bound


def certified_step_rdp(p: LMOParams, orders=None, *, d_min: float = 1e-4,
                       ratio: float = 1.002) -> np.ndarray:
    """rho(alpha) >= sup over ||D||_2 <= 1 (any dimension) of the RDP of the d-dim mechanism.

    rho(alpha) = sup_{0<D<=1} f_alpha(D)/D^2, evaluated as the max of its D -> 0 limit
    alpha E[u^2]/2 and, on a geometric grid D_j in [d_min, 1], f(D_{j+1}) / D_j^2 (f increases in
    D, so this brackets each cell from above). Orders default to 2..128. Returns (len(orders),).
    """
    o = _check_orders(PAPER_ORDERS if orders is None else orders)
    n = int(math.ceil(math.log(1.0 / d_min) / math.log(ratio))) + 1
    grid = np.exp(np.linspace(math.log(d_min), 0.0, n))
    f = np.stack([coordinate_rdp(p, o, s) for s in grid], axis=1)  # [orders, grid]
    with np.errstate(invalid="ignore"):
        cell = f[:, 1:] / grid[None, :-1] ** 2
    limit = o * p.second_moment_u() / 2
    return np.maximum(limit, cell.max(axis=1))


def l1_route_step_rdp(p: LMOParams, dim: int, orders=PAPER_ORDERS) -> np.ndarray:
    """The naive valid route: f is convex with f(0) = 0, so sum_i f(|D_i|) <= f(||D||_1) <= f(sqrt(d)).
    For realistic d the MGF is undefined at sqrt(d) * (alpha - 1): every order is +inf."""
    return coordinate_rdp(p, orders, math.sqrt(int(dim)))


def subsampled_rdp_upper(step_rdp, sample_rate: float) -> np.ndarray:
    """General Poisson-subsampled RDP upper bound (Zhu & Wang 2019, Thm. 6) for ANY mechanism.

    Args: step_rdp: (A-1,) RDP of the un-subsampled mechanism at integer orders 2..A.
    Returns: (A-1,) subsampled RDP at the same orders (+inf where some needed term is +inf).
    """
    e = np.asarray(step_rdp, dtype=np.float64).reshape(-1)
    q = float(sample_rate)
    if not 0 <= q <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    if q == 0:
        return np.zeros_like(e)
    lq = math.log(q)
    l1q = math.log1p(-q) if q < 1 else -math.inf
    out = np.empty_like(e)
    for i in range(e.size):
        a = i + 2
        ls = np.arange(2, a + 1)
        rest = (a - ls) * l1q if q < 1 else np.where(ls == a, 0.0, -np.inf)
        logc = gammaln(a + 1) - gammaln(ls + 1) - gammaln(a - ls + 1)
        terms = logc + ls * lq + rest + (ls - 1) * e[:a - 1]
        terms[1:] += math.log(3.0)
        first = ((a - 1) * l1q if q < 1 else -math.inf) + math.log(a * q - q + 1)
        with np.errstate(invalid="ignore"):
            out[i] = logsumexp(np.append(terms, first)) / (a - 1)
    return np.where(np.isnan(out), np.inf, out)


def certified_epsilon(p: LMOParams, *, sample_rate: float, steps: int, delta: float,
                      max_order: int = 128) -> EpsilonReport:
    """A certified (epsilon, delta) for training with LMO noise, clip norm C and noise scale C/u,
    any model dimension: rho(alpha) per step, subsampled (Zhu-Wang), composed over ``steps``."""
    o = np.arange(2, int(max_order) + 1, dtype=np.float64)
    rho = certified_step_rdp(p, o)
    sub = subsampled_rdp_upper(rho, sample_rate) * int(steps)
    eps, order = rdp_to_epsilon(o, sub, delta)
    return EpsilonReport(eps, delta, True, "certified upper bound (RDP, any model dimension)",
                         {"order": order, "sample_rate": sample_rate, "steps": steps,
                          "gaussian_like_sigma": 1 / math.sqrt(p.second_moment_u())})


def _dlog_mgf(p: LMOParams, t: float) -> tuple[float, float]:
    """(K'(t), K''(t)) for K = log M (closed forms; t in the MGF's domain)."""
    g, e, w = p.a1 * p.theta, p.a3 / p.lam, p.a4 * (p.b - p.a)
    x = w * t
    if abs(x) < 1e-4:
        h1, h2 = 0.5 + x / 12, 1.0 / 12
    elif abs(x) > 40:  # e^{-|x|} below double precision relative to the other terms
        h1, h2 = (1.0 if x > 0 else 0.0) - 1.0 / x, 1.0 / (x * x)
    else:
        h1 = 1.0 / -math.expm1(-x) - 1.0 / x
        h2 = 1.0 / (x * x) - 1.0 / (4 * math.sinh(x / 2) ** 2)
    k1 = p.k * g / (1 - g * t) + e / (1 - e * t) + p.a4 * p.a + w * h1
    k2 = p.k * g * g / (1 - g * t) ** 2 + e * e / (1 - e * t) ** 2 + w * w * h2
    return k1, k2


def fisher_sigma(p: LMOParams) -> float:
    """1/sqrt(I), I = the Fisher information of the noise's location family (p(x) = E[u e^{-u|x|}]/2).

    When a clipped gradient is spread over many coordinates (D_i -> 0, sum D_i^2 = 1), the privacy
    loss of one release is a sum of many small independent terms and tends to N(I/2, I): the
    mechanism behaves like the Gaussian with sigma = 1/sqrt(I). An asymptotic estimate for large d,
    not a bound (the certified bound uses E[u^2] >= I). I = int_0^inf M(-s) (K''+K'^2)^2 / K' ds.
    """
    from scipy.integrate import quad

    def f(s):
        k1, k2 = _dlog_mgf(p, -s)
        return math.exp(float(log_mgf(p, -s))) * (k2 + k1 * k1) ** 2 / k1
    val, _ = quad(f, 0, np.inf, limit=400)
    return 1.0 / math.sqrt(val)


def log_density(p: LMOParams, x) -> np.ndarray:
    """log of the noise density p(x) = E[u e^{-u|x|}] / 2 = M(-|x|) K'(-|x|) / 2 (clip norm 1).

    Vectorised over x (float64). Used by the audit's likelihood-ratio score."""
    t = -np.abs(np.asarray(x, dtype=np.float64))
    g, e, w = p.a1 * p.theta, p.a3 / p.lam, p.a4 * (p.b - p.a)
    z = w * t                                                  # <= 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mid = 1.0 / -np.expm1(-np.where(z == 0, -1.0, z)) - 1.0 / np.where(z == 0, -1.0, z)
        h1 = np.where(np.abs(z) < 1e-4, 0.5 + z / 12, np.where(z < -40, -1.0 / z, mid))
    k1 = p.k * g / (1 - g * t) + e / (1 - e * t) + p.a4 * p.a + w * h1
    return math.log(0.5) + log_mgf(p, t) + np.log(k1)
