"""Warm-started vs cold RMT denoising over consecutive steps, on the CPU: GEMM passes per matrix
and accuracy against the exact SVD, for a few signal histories. Counts, not times (the CPU is
shared; bench_denoise.py::test_denoise_steps measures time on the GPU).

Matrices: 256 x 688, 256 x 256, 688 x 256 (the Llama-1B aspect ratios, scaled down); sigma_e =
1e-3; 8 steps; fresh noise every step. Scenarios (signal values in noise units):
  - near-edge, drift: x_j = 3 / j, j = 1..16 (the benchmark's profile), vectors drift 0.05 rad/step;
  - strong, drift: 10, 6, 4, 3, 2, 1.5, 1.2, 1.0 (7-8 values kept: the cold path reruns at rank 16);
  - strong, fast drift (0.3 rad/step) and strong with an abrupt change of subspace at step 4;
  - emerging: pure noise until step 3, then a rank-1 signal of x = 1.6;
  - pure noise.
Per step and path: passes per matrix, max over matrices of ||out - exact|| / ||exact - signal||
("diff", the distance to the exact-SVD denoise as a fraction of its own error to the signal) and
||out - signal|| / ||exact - signal|| ("ratio"), ranks kept vs the exact path's.

    .venv/bin/python bench/denoise_steps_cpu.py            # writes bench/results/denoise_steps_cpu/
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpkern.denoise import RMTDenoiser  # noqa: E402
from tests.denoise.planted import drifting  # noqa: E402

SIGMA = 1e-3
SHAPES = {"q": (256, 688), "o": (256, 256), "down": (688, 256)}
STRONG = [10.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.2, 1.0]
SCENARIOS = {
    "near-edge drift": dict(xs=[3.0 / j for j in range(1, 17)], delta=0.05),
    "strong drift": dict(xs=STRONG, delta=0.05),
    "strong fast drift": dict(xs=STRONG, delta=0.3),
    "strong abrupt@4": dict(xs=STRONG, delta=0.05, abrupt_at=(4,)),
    "emerging@3": dict(xs=[1.6], delta=0.05, appear_at=3),
    "pure noise": dict(xs=[0.0], delta=0.05),
}


def run(name, steps, seed, warm_kw):
    kw = dict(SCENARIOS[name])
    seq = drifting(steps, SHAPES, kw.pop("xs"), SIGMA, seed, **kw)
    paths = {"cold": RMTDenoiser(seed=seed, warm_start=False),
             "warm": RMTDenoiser(seed=seed, **warm_kw)}
    rows = []
    for t, (signal, noisy) in enumerate(seq):
        ex = {k: v.clone() for k, v in noisy.items()}
        exact = RMTDenoiser(method="exact")
        exact(ex, SIGMA)
        row = {"step": t, "exact_ranks": exact.last_ranks}
        for p, den in paths.items():
            out = {k: v.clone() for k, v in noisy.items()}
            den(out, SIGMA)
            stat = {k: float((ex[k] - signal[k]).norm()) for k in SHAPES}
            diff = ratio = float("nan")                 # undefined while there is no signal
            if all(float(signal[k].norm()) > 0 for k in SHAPES):
                diff = max(float((out[k] - ex[k]).norm()) / stat[k] for k in SHAPES)
                ratio = max(float((out[k] - signal[k]).norm()) / stat[k] for k in SHAPES)
            st = den.last_stats
            row[p] = dict(passes=st["passes_per_matrix"], diff=diff, ratio=ratio,
                          ranks=den.last_ranks, reruns=st["reruns"], unconverged=st["unconverged"])
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tol", type=float, default=None, help="RMTDenoiser tol (default: its own)")
    ap.add_argument("--min-iter", type=int, default=None)
    ap.add_argument("--warm-passes", default=None,
                    help="RMTDenoiser warm_passes (default: its own; 'none': the adaptive test)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "denoise_steps_cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    warm_kw = {k: v for k, v in (("tol", args.tol), ("min_iter", args.min_iter)) if v is not None}
    if args.warm_passes is not None:
        warm_kw["warm_passes"] = None if args.warm_passes == "none" else int(args.warm_passes)
    cfg = RMTDenoiser(**warm_kw).kwargs
    results, lines = {}, []
    lines.append(f"# Warm-started vs cold RMT denoising over {args.steps} steps (CPU, counts only)"
                 "\n")
    lines.append(f"Shapes {list(SHAPES.values())}, sigma_e {SIGMA}, seeds {args.seeds}; warm: "
                 f"warm_passes={cfg['warm_passes']}, tol={cfg['tol']}, min_iter={cfg['min_iter']}, "
                 f"carry={cfg['carry']}, resync_every={RMTDenoiser(**warm_kw).resync_every}, "
                 f"rank={cfg['rank']}, oversample={cfg['oversample']}, n_iter cap={cfg['n_iter']}. "
                 "Steps after the first (step 0 is cold on both paths). diff = max ||out - exact||"
                 " / ||exact - signal||; ratio = max ||out - signal|| / ||exact - signal|| (both "
                 "over the steps with a signal); rank mismatch = matrix-steps whose kept rank "
                 "differs from the exact SVD's.\n")
    lines.append("| scenario | passes/matrix cold | warm (min-max) | diff cold | diff warm | ratio "
                 "cold | ratio warm | rank mismatch cold | warm | warm reruns | unconverged |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in SCENARIOS:
        per_seed = [run(name, args.steps, seed, warm_kw) for seed in range(args.seeds)]
        results[name] = per_seed
        later = [r for rows in per_seed for r in rows[1:]]
        agg = {}
        for p in ("cold", "warm"):
            ps = [r[p]["passes"] for r in later]
            finite = lambda key: [r[p][key] for r in later if r[p][key] == r[p][key]]  # noqa: E731
            agg[p] = dict(mean=sum(ps) / len(ps), lo=min(ps), hi=max(ps),
                          diff=max(finite("diff"), default=float("nan")),
                          ratio=(min(finite("ratio"), default=float("nan")),
                                 max(finite("ratio"), default=float("nan"))),
                          mismatch=sum(r[p]["ranks"][k] != r["exact_ranks"][k]
                                       for r in later for k in SHAPES),
                          reruns=sum(r[p]["reruns"] for r in later),
                          unconverged=sum(r[p]["unconverged"] for r in later))
        c, w = agg["cold"], agg["warm"]
        if c["diff"] != c["diff"]:          # no step with a signal: diff and ratio undefined
            acc = "- | - | - | -"
        else:
            acc = (f"{c['diff']:.3f} | {w['diff']:.3f} | {c['ratio'][0]:.3f}-{c['ratio'][1]:.3f} | "
                   f"{w['ratio'][0]:.3f}-{w['ratio'][1]:.3f}")
        warm = f"{w['mean']:.1f} ({w['lo']:.1f}-{w['hi']:.1f})"
        lines.append(f"| {name} | {c['mean']:.1f} | {warm} | {acc} | {c['mismatch']} | "
                     f"{w['mismatch']} | {w['reruns']} | {w['unconverged']} |")
        print(lines[-1], flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"config": dict(cfg), "steps": args.steps, "results": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
