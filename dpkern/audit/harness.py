"""The one-run audit of a training procedure: canaries in, final weights out, an epsilon lower bound.

``one_run_audit(train_fn, ...)`` needs only a callable "train on this dataset, return the final
weights": it draws secret coins, mixes the included Dirac canaries into the data in a random order,
trains once, scores every canary from the final weights, guesses "in" for the k_pos highest and
"out" for the k_neg lowest scores, and turns (r guesses, v right) into lower bounds on epsilon
(dpkern.audit.bounds). A correct DP-SGD must give ``eps_lower <= eps_claimed`` (except with
probability beta); a broken one (no clipping, too little noise) is caught when its true epsilon is
well above the claim.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch

from dpkern.audit import bounds
from dpkern.audit.canaries import DiracCanaries, count, guess


@dataclass
class AuditResult:
    """What one audit measured. eps_* are lower bounds at confidence 1 - beta (see bounds.py)."""

    m: int
    r: int
    v: int
    k_pos: int
    k_neg: int
    delta: float
    beta: float
    eps_lower: float            # Steinke et al. 2023, (eps, delta)-DP
    eps_lower_fdp: float        # Mahloujifar et al. 2024, (eps, delta)-DP curve
    mu_lower: float             # Mahloujifar et al. 2024, mu-GDP curve
    eps_lower_gdp: float        # eps(delta) of mu_lower-GDP (valid if the curve is Gaussian)
    eps_claimed: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def eps_lower_rigorous(self) -> float:
        """The larger of the two bounds valid for any (eps, delta)-DP mechanism."""
        return max(self.eps_lower, self.eps_lower_fdp)

    def violates_claim(self) -> bool:
        """True when the audit proves (at 1 - beta) that the claimed eps is wrong."""
        return self.eps_claimed is not None and self.eps_lower_rigorous > self.eps_claimed

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eps_lower_rigorous"] = self.eps_lower_rigorous
        d["violates_claim"] = self.violates_claim()
        return d


def audit_scores(scores: torch.Tensor, included: torch.Tensor, *, k_pos: int, k_neg: int,
                 delta: float, beta: float = 0.05, eps_claimed: float | None = None) -> AuditResult:
    """Audit from canary scores [m] (higher = more likely in) and the secret coins [m] bool."""
    if scores.shape != included.shape or scores.dim() != 1:
        raise ValueError(f"scores and included must both have shape [m], got {tuple(scores.shape)} "
                         f"and {tuple(included.shape)}")
    g = guess(scores.double().cpu(), k_pos, k_neg)
    r, v = count(g, included.cpu())
    m = scores.numel()
    mu = bounds.mu_lower_bound(m, r, v, beta)
    return AuditResult(
        m=m, r=r, v=v, k_pos=k_pos, k_neg=k_neg, delta=delta, beta=beta,
        eps_lower=bounds.epsilon_lower_bound(m, r, v, delta, beta),
        eps_lower_fdp=bounds.epsilon_lower_bound_fdp(m, r, v, delta, beta, family="approx_dp"),
        mu_lower=mu,
        eps_lower_gdp=bounds.epsilon_lower_bound_fdp(m, r, v, delta, beta, family="gdp"),
        eps_claimed=eps_claimed,
    )


TrainFn = Callable[[torch.Tensor], "torch.Tensor | Mapping[str, Any]"]


def one_run_audit(train_fn: TrainFn, canaries: DiracCanaries, *, data: torch.Tensor | None = None,
                  k_pos: int, k_neg: int, delta: float, beta: float = 0.05,
                  direction: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> AuditResult:
    """Trains once with the included canaries and audits the result.

    Args:
        train_fn: ``train_fn(dataset [N, dim]) -> final weights [out, dim]`` or a mapping with keys
            ``final`` (required), ``initial`` (weights before training; default zeros on the canary
            columns) and ``epsilon`` (the epsilon the run claims, compared in ``violates_claim``).
        canaries: the canaries with their secret coins (``DiracCanaries.create``).
        data: real examples [N0, dim] (must not touch canary coordinates), or None.
        k_pos, k_neg: how many "in" / "out" guesses; fix them before training.
        delta, beta: the delta of the claim and the allowed failure probability of the bound.
        direction: [out] the push of an included canary on its column (see ``DiracCanaries.scores``).
        generator: shuffles the dataset order (default: a fresh OS-seeded permutation).
    Returns:
        AuditResult; ``extra`` holds the dataset size and the number of included canaries.
    """
    dim = canaries.dim
    if data is None:
        data = torch.zeros(0, dim)
    canaries.check_disjoint(data)
    x_in = canaries.included_inputs(dtype=data.dtype)
    dataset = torch.cat([data, x_in], dim=0)
    perm = torch.randperm(dataset.shape[0], generator=generator)
    out = train_fn(dataset[perm])
    if isinstance(out, torch.Tensor):
        out = {"final": out}
    if "final" not in out:
        raise ValueError("train_fn must return the final weights or a mapping with key 'final'")
    scores = canaries.scores(out["final"], out.get("initial"), direction)
    if not torch.isfinite(scores).all():
        raise ValueError("train_fn returned non-finite weights on canary columns")
    eps_claimed = out.get("epsilon")
    if eps_claimed is not None:
        eps_claimed = float(eps_claimed)
        if math.isnan(eps_claimed):
            raise ValueError("train_fn returned epsilon=NaN")
    res = audit_scores(scores, canaries.included, k_pos=k_pos, k_neg=k_neg, delta=delta, beta=beta,
                       eps_claimed=eps_claimed)
    res.extra.update(dataset_size=int(dataset.shape[0]), included=int(canaries.included.sum()))
    return res
