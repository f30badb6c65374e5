"""The LMO-DP offline search, vectorised: every configuration of a grid at once, in chunks.

Objective (the paper's "usefulness"): P(|noise| <= gamma) for noise = Laplace(0, 1/u), which is
E[1 - exp(-gamma u)] = 1 - M(-gamma). Constraint: the one-step eps_lmo of the paper's accountant
(lmo_accountant.lmo_epsilon) is below a target. Both are closed forms in the MGF, so a chunk of
configurations x 127 orders is a handful of numpy array operations; the full default grid
(~0.5 M configurations) takes seconds to a minute on one core, not the paper's hour.

The search optimises the paper's objective under the paper's (uncertified) epsilon; it does not
make that epsilon a guarantee. See README.md.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from dpkern.mechanisms.lmo_accountant import PAPER_ORDERS, log_mgf, lmo_rdp
from dpkern.mechanisms.lmo_params import PAPER_DEFAULT, LMOParams

WEIGHTS = tuple(round(0.1 * i, 1) for i in range(1, 10))       # a1, a3, a4 in {0.1, ..., 0.9}
THETA_K = tuple(itertools.product((0.05, 0.1, 0.25, 0.5, 1.0, 2.0), (0.5, 1.0, 2.0)))
LAMS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)                         # Exponential rates
UNIFORMS = ((0.0, 1.0), (0.5, 1.0), (1.0, 2.0), (1.0, 3.0), (2.0, 4.0), (0.0, 5.0))
_FIELDS = ("a1", "a3", "a4", "theta", "k", "lam", "a", "b")


@dataclass(frozen=True)
class SearchResult:
    """Best configuration found; ``eps_lmo`` is the paper's (uncertified) one-step epsilon."""

    params: LMOParams
    eps_lmo: float
    usefulness: float
    n_configs: int
    n_feasible: int
    seconds: float


def usefulness(p, gamma: float = 0.9):
    """P(|noise| <= gamma) = 1 - M(-gamma); works on LMOParams or on (n,)-array fields."""
    return 1.0 - np.exp(log_mgf(p, -float(gamma)))


def _grid(weights, theta_k, lams, uniforms) -> np.ndarray:
    """All combinations as an (n, 8) float64 array in _FIELDS order."""
    rows = [(a1, a3, a4, th, k, lam, a, b)
            for a1, a3, a4 in itertools.product(weights, repeat=3)
            for th, k in theta_k for lam in lams for a, b in uniforms]
    return np.asarray(rows, dtype=np.float64)


def search(target_eps: float, delta: float = 1e-10, *, gamma: float = 0.9,
           weights=WEIGHTS, theta_k=THETA_K, lams=LAMS, uniforms=UNIFORMS,
           orders=PAPER_ORDERS, mgf_domain: str = "strict", chunk: int = 8192) -> SearchResult:
    """Maximise usefulness(gamma) over the grid subject to eps_lmo(delta) < target_eps.

    Example::

        r = search(1.5)            # r.params, r.eps_lmo < 1.5, r.usefulness
    Raises ValueError if no configuration of the grid is feasible.
    """
    if not target_eps > 0:
        raise ValueError(f"target_eps must be > 0, got {target_eps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    t0 = time.perf_counter()
    grid = _grid(weights, theta_k, lams, uniforms)
    o = np.asarray(orders, dtype=np.float64)
    conv = np.log((o - 1) / o) - (math.log(delta) + np.log(o)) / (o - 1)  # Balle et al. shift
    best = (-np.inf, None, math.inf)
    n_feasible = 0
    for start in range(0, grid.shape[0], chunk):
        g = grid[start:start + chunk]
        cols = SimpleNamespace(**{f: g[:, i:i + 1] for i, f in enumerate(_FIELDS)})  # (n, 1)
        eps = (lmo_rdp(cols, o, mgf_domain=mgf_domain) + conv).min(axis=1)        # (n,)
        use = usefulness(SimpleNamespace(**{f: g[:, i] for i, f in enumerate(_FIELDS)}), gamma)
        ok = np.isfinite(eps) & (eps < target_eps) & np.isfinite(use)
        n_feasible += int(ok.sum())
        if ok.any():
            cand = np.where(ok, use, -np.inf)
            i = int(np.argmax(cand))
            if cand[i] > best[0]:
                best = (float(cand[i]), g[i], float(eps[i]))
    if best[1] is None:
        raise ValueError(f"no configuration of the grid has eps_lmo < {target_eps} at delta={delta} "
                         f"(mgf_domain={mgf_domain!r}); widen the grid or raise the target")
    params = LMOParams(**{f: float(v) for f, v in zip(_FIELDS, best[1])})
    return SearchResult(params, best[2], best[0], grid.shape[0], n_feasible,
                        time.perf_counter() - t0)


def default_usefulness(gamma: float = 0.9) -> float:
    """Usefulness of the artifact's default configuration (the search's baseline)."""
    return float(usefulness(PAPER_DEFAULT, gamma))
