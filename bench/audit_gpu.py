"""The large one-run audit of the engine: m >= 10^4 Dirac canaries, real Poisson sampler, engine and
PRV accountant, one training run per claimed epsilon.

    python bench/audit_gpu.py --device cuda --m 30000           # on the GPU machine
    python bench/audit_gpu.py --device cpu --m 10000            # also fine on a CPU (tiny model)

The canary inputs are dense one-hot rows ((m/2 + m/10) x m floats), so m = 3e4 needs ~2 GB and
m = 1e5 would need ~24 GB of host memory.
Writes audit_<device>_m<m>.json (and prints a table) under --out (default bench/results/audit).
Guess counts k are fixed in advance; the bound is taken over the list with a Bonferroni split of beta,
so the reported maximum is still valid at confidence 1 - beta.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from dpkern.accounting import get_noise_multiplier
from dpkern.audit import DiracCanaries, audit_scores
from dpkern.engine import PrivacyEngine

BASE, DELTA, BETA = 16, 1e-5, 0.05


def train_once(dataset, *, sigma, q, steps, expected, device, seed, clip=True):
    dim = dataset.shape[1]
    model = torch.nn.Linear(dim, 1, bias=False).to(device)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(dataset), batch_size=expected)
    eng = PrivacyEngine(accountant="prv")
    model, opt, loader = eng.make_private(module=model, optimizer=opt, data_loader=loader,
                                          noise_multiplier=sigma, max_grad_norm=1.0,
                                          sample_rate=q, expected_batch_size=expected, seed=seed,
                                          loss_reduction="sum", average_sum=True)
    loader.batch_sampler.steps = steps
    for (x,) in loader:
        if x.shape[0]:
            # sum of per-sample losses: 'mean' is refused where TF32 rounding of 1/B would leak
            (-model(x.to(device)).sum(dim=1)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model.weight.detach().cpu(), eng.get_epsilon(DELTA)


def run(m: int, eps_target: float, q: float, steps: int, device: str, seed: int, ks: list[int]):
    gen = torch.Generator().manual_seed(seed)
    n_base = max(1000, m // 10)
    canaries = DiracCanaries.create(m, BASE + m, scale=100.0, generator=gen)
    data = torch.zeros(n_base, BASE + m)
    data[:, :BASE] = torch.randn(n_base, BASE, generator=gen)
    dataset = torch.cat([data, canaries.included_inputs()])
    dataset = dataset[torch.randperm(dataset.shape[0], generator=gen)]
    sigma = get_noise_multiplier(eps_target, DELTA, q, steps)
    expected = max(1, round(q * (n_base + m / 2)))
    t0 = time.perf_counter()
    final, eps = train_once(dataset, sigma=sigma, q=q, steps=steps, expected=expected,
                            device=device, seed=seed)
    train_s = time.perf_counter() - t0
    scores = canaries.scores(final)
    best = None
    for k in ks:
        res = audit_scores(scores, canaries.included, k_pos=k, k_neg=k, delta=DELTA,
                           beta=BETA / len(ks), eps_claimed=eps)
        if best is None or res.eps_lower_rigorous > best.eps_lower_rigorous:
            best = res
    out = best.as_dict()
    out.update(sigma=sigma, q=q, steps=steps, expected_batch=expected, n_base=n_base,
               ks=ks, beta_total=BETA, train_seconds=train_s)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--m", type=int, default=10_000)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--q", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/audit"))
    args = ap.parse_args()
    if args.m < 1000:
        raise SystemExit("--m must be >= 1000 (the CI test covers small m)")
    ks = [k for k in (args.m // 100, args.m // 30, args.m // 10) if k > 0]
    rows = [run(args.m, e, args.q, args.steps, args.device, args.seed + i, ks)
            for i, e in enumerate(args.eps)]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    meta = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "cpu": platform.processor(), "torch": torch.__version__, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "m": args.m}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"audit_{args.device}_m{args.m}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "runs": rows}, f, indent=2)
    print(f"{'claimed':>8} {'eps_lower':>9} {'eps_fdp':>8} {'mu_lower':>8} {'eps_gdp':>8} "
          f"{'k':>6} {'v/r':>11} violates")
    for r in rows:
        print(f"{r['eps_claimed']:8.3f} {r['eps_lower']:9.3f} {r['eps_lower_fdp']:8.3f} "
              f"{r['mu_lower']:8.3f} {r['eps_lower_gdp']:8.3f} {r['k_pos']:6d} "
              f"{r['v']:5d}/{r['r']:<5d} {r['violates_claim']}")
    print("wrote", path)
    if any(r["violates_claim"] for r in rows):
        raise SystemExit("AUDIT FAILED: an epsilon lower bound exceeds the claimed epsilon")


if __name__ == "__main__":
    main()
