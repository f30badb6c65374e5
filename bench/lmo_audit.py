"""LMO-DP's epsilon, checked: four accountings of one schedule, and a one-run canary audit.

    python bench/lmo_audit.py [--m 100000] [--out 16] [--device cpu|cuda] [--json PATH]

Part 1 (accounting, no sampling): for the artifact's default configuration on an SST-2-like
schedule (q = 1024/67349, 6 epochs, delta = 1e-10): LMO-DP's reported epsilon (artifact and strict
MGF domain), the large-d Gaussian-equivalent (sigma = 1/sqrt(Fisher information), composed by the
PRV accountant: an asymptotic estimate), and the certified RDP bound.

Part 2 (audit, dpkern.audit): one release of m canaries, each owning an `out`-wide gradient column
(a clipped canary gradient of norm C spread evenly over it, as in a real layer), plus mechanism
noise drawn by the mechanism objects; score = the likelihood ratio of "included" for the column
under the mechanism's public noise law (for the Gaussian, <column, push>); the one-run audit bounds
(Steinke et al. 2023; Mahloujifar et al. 2024) at 95 % confidence. LMO-DP (claim: its one-step
epsilon) against a Gaussian with sigma_eq (the same claim). If eps_lower > claim, the claim is
refuted. One-run audits need many canaries to certify small epsilons; the script reports what it
finds, not what it hopes for.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpkern.audit import audit_scores, draw_coins  # noqa: E402
from dpkern.mechanisms import GaussianMechanism, LMOMechanism  # noqa: E402
from dpkern.mechanisms import lmo_accountant as A  # noqa: E402
from dpkern.mechanisms.lmo_params import PAPER_DEFAULT  # noqa: E402
from dpkern.noise import NoiseGenerator  # noqa: E402

DELTA = 1e-10
Q, STEPS = 1024 / 67349, round(6 * 67349 / 1024)


def accounting(p=PAPER_DEFAULT) -> dict:
    from dpkern.accounting.prv import PRVAccountant
    out = {"schedule": {"sample_rate": Q, "steps": STEPS, "delta": DELTA}}
    for dom in ("artifact", "strict"):
        r = A.reported_epsilon(p, sample_rate=Q, steps=STEPS, delta=DELTA, mgf_domain=dom)
        out[f"reported_{dom}"] = {"epsilon": r.epsilon, **{k: r.details[k] for k in
                                                          ("eps_lmo", "sigma_eq")}}
    sig = A.fisher_sigma(p)
    acc = PRVAccountant()
    acc.step(noise_multiplier=sig, sample_rate=Q, num_steps=STEPS)
    out["large_d_gaussian_equivalent"] = {"sigma": sig, "epsilon": acc.get_epsilon(DELTA)}
    c = A.certified_epsilon(p, sample_rate=Q, steps=STEPS, delta=DELTA)
    out["certified_rdp"] = {"epsilon": c.epsilon, "order": c.details["order"]}
    mech = LMOMechanism(p, accounting="certified")
    out["lmo_noise_std"] = mech.noise_std()
    return out


def lr_score(mech, release: torch.Tensor, push: torch.Tensor) -> torch.Tensor:
    """[m] log-likelihood ratio of "canary included" (shift = push) for each column."""
    x = release.double().cpu()
    if isinstance(mech, LMOMechanism):
        ld = lambda v: torch.from_numpy(A.log_density(mech.params, v.numpy()))  # noqa: E731
        return (ld(x - push.double()) - ld(x)).sum(dim=1)
    return x @ push.double()  # Gaussian: the likelihood ratio is linear


def audit(mech, claim: float, m: int, width: int, device: str, seed: int) -> dict:
    """One noisy release of m canary columns of `width` coordinates; C = 1."""
    gen = torch.Generator().manual_seed(seed)
    coins = draw_coins(m, gen)
    direction = torch.ones(width) / math.sqrt(width)              # unit push, norm C = 1
    release = coins.float()[:, None].to(device) * direction.to(device)  # [m, width] clipped sum
    noise_gen = NoiseGenerator(secure=False, seed=seed)
    mech.add_noise_(release, generator=noise_gen, step=0)
    scores = lr_score(mech, release, direction)
    k = max(1, m // 100)
    res = audit_scores(scores, coins, k_pos=k, k_neg=k, delta=DELTA, eps_claimed=claim)
    return {"claimed": claim, "eps_lower": res.eps_lower, "eps_lower_fdp": res.eps_lower_fdp,
            "mu_lower": res.mu_lower, "guesses": res.r, "right": res.v,
            "violates_claim": res.violates_claim()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=100_000)
    ap.add_argument("--out", type=int, default=16, help="coordinates per canary column")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    report = {"accounting": accounting()}
    eps_lmo, _ = A.lmo_epsilon(PAPER_DEFAULT, DELTA, mgf_domain="artifact")
    lmo = LMOMechanism(PAPER_DEFAULT, accept_uncertified_epsilon=True, mgf_domain="artifact")
    gauss = GaussianMechanism(A.sigma_equivalent(eps_lmo, DELTA))
    report["audit_one_release"] = {
        "m": args.m, "width": args.out,
        "lmo_artifact_claim": audit(lmo, eps_lmo, args.m, args.out, args.device, args.seed),
        "gaussian_sigma_eq": audit(gauss, eps_lmo, args.m, args.out, args.device, args.seed + 1),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
