"""Performance report from the latest GPU results: markdown table + PNG, and the README section.

    python bench/perf_report.py                                   # newest run under bench/results
    python bench/perf_report.py --run bench/results/gpu_run2_h100 [--e2e path/to/e2e.csv]

Reads a gpu_all.sh run folder (bench.json, env.txt, bench.log for failures; an e2e CSV from
bench/e2e_step.py in the folder or given with --e2e) and writes bench/results/perf/perf.md,
perf.png and readme_section.md; prints the README section. Only reportable cases (passed, check
not failed: bench/history.py) are shown as numbers; failed cases are listed as failed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.history import (outcomes_from_log, parse_env_txt, records_from_bench_json,  # noqa: E402
                           reportable)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DPKERN_BACKENDS = ("cuda", "triton")
KERNEL_OPS = ("rownorm_sq", "linear_norm_sq", "bookkeeping_wgrad", "embedding_norm_sq")


def find_runs(results=RESULTS) -> list[Path]:
    """Run folders (with bench.json and env.txt), oldest first by the date in env.txt."""
    def when(d: Path):
        txt = parse_env_txt(d / "env.txt").get("date", "")
        for fmt in ("%a %b %d %I:%M:%S %p %Z %Y", "%a %b %d %H:%M:%S %Z %Y"):
            try:
                return datetime.datetime.strptime(" ".join(txt.split()), fmt)
            except ValueError:
                continue
        return datetime.datetime.fromtimestamp((d / "bench.json").stat().st_mtime)
    runs = [p.parent for p in Path(results).glob("*/bench.json") if (p.parent / "env.txt").exists()]
    return sorted(runs, key=when)


def _shape(rec) -> str:
    s = rec.get("shape")
    return "x".join(str(v) for v in s) if isinstance(s, list) else ""


def _dtype(rec) -> str:
    return str(rec.get("dtype") or "").replace("torch.", "").replace("float32", "fp32").replace(
        "bfloat16", "bf16")


def kernel_rows(recs: list) -> list[dict]:
    """Per (op, method, shape, dtype): the fastest reportable dpkern backend, its rate and fraction
    of the ceiling, the torch reference and (book-keeping) the non-private matmul."""
    groups: dict = {}
    for r in recs:
        if r.get("op") not in KERNEL_OPS:
            continue
        method = "" if "[" not in r["name"] else ("ghost" if "-ghost-" in r["name"] else
                                                  "instantiate" if "-instantiate-" in r["name"] else "")
        groups.setdefault((r["op"], method, _shape(r), _dtype(r)), []).append(r)
    rows = []
    for (op, method, shape, dtype), rs in groups.items():
        ours = [r for r in rs if r.get("backend") in DPKERN_BACKENDS and reportable(r)]
        failed = [r["backend"] for r in rs if r.get("backend") in DPKERN_BACKENDS and not reportable(r)]
        ref = next((r for r in rs if r.get("backend") == "torch" and reportable(r)), None)
        mm = next((r for r in rs if r.get("backend") == "matmul" and reportable(r)), None)
        best = min(ours, key=lambda r: r["median_ms"]) if ours else None
        row = {"op": op + (f" ({method})" if method else ""), "shape": shape, "dtype": dtype,
               "backend": best and best["backend"], "ms": best and best["median_ms"],
               "iqr_ms": best and best.get("iqr_ms"),
               "rate": best and (f"{best['gbps']:.0f} GB/s" if "gbps" in best else
                                 f"{best['tflops']:.0f} TFLOP/s" if "tflops" in best else ""),
               "frac": best and best.get("frac_of_ceiling"),
               "vs_torch": (ref["median_ms"] / best["median_ms"]) if best and ref else None,
               "vs_matmul": (best["median_ms"] / mm["median_ms"]) if best and mm else None,
               "peak_mib": best and best.get("peak_mem_bytes", 0) / 2**20,
               "failed": ", ".join(failed)}
        rows.append(row)
    return rows


def other_rows(recs: list) -> list[dict]:
    """Noise step / noise add / denoise cases: each reportable case with its time and rate."""
    rows = []
    for r in recs:
        if r.get("op") in KERNEL_OPS or not r.get("op") or r["op"].startswith(("fp32_mode", "config")):
            continue
        if not reportable(r):
            continue
        rate = (f"{r['gbps']:.0f} GB/s" if "gbps" in r else "")
        rows.append({"case": r["name"].replace("test_", "", 1), "ms": r["median_ms"],
                     "iqr_ms": r.get("iqr_ms"), "rate": rate, "frac": r.get("frac_of_ceiling")})
    return rows


def _f(v, fmt):
    return "" if v is None else format(v, fmt)


def kernel_table(rows: list) -> str:
    out = ["| op | shape | dtype | backend | median ms (IQR) | rate | % of ceiling | vs torch ref | "
           "time / non-private matmul |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["ms"] is None:
            out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | failed: {r['failed'] or 'none'}"
                       " | not reported | | | | |")
            continue
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['backend']} | "
                   f"{r['ms']:.4f} ({_f(r['iqr_ms'], '.4f')}) | {r['rate']} | "
                   f"{_f(r['frac'] and 100 * r['frac'], '.0f')}% | {_f(r['vs_torch'], '.1f')}x | "
                   f"{_f(r['vs_matmul'], '.2f')} |")
    return "\n".join(out)


def e2e_table(path: Path) -> str:
    rows = list(csv.DictReader(open(path)))
    out = ["| B | T | precision | mode | ms | time vs non-private | memory vs non-private | FLOP floor | status |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fl = lambda k, fmt: _f(float(r[k]) if r.get(k) not in (None, "", "None") else None, fmt)  # noqa: E731
        out.append(f"| {r['B']} | {r['T']} | {r['precision']} | {r['mode']} | {fl('median_ms', '.1f')} | "
                   f"{fl('time_ratio', '.2f')} | {fl('mem_ratio', '.2f')} | {fl('floor', '.2f')} | "
                   f"{r.get('status', '')} |")
    return "\n".join(out)


def plot(rows: list, path: Path, gpu: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["frac"] is not None]
    labels = [f"{r['op']} {r['shape']} {r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [100 * r["frac"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.axvline(100, color="k", lw=0.8)
    ax.set_xlabel("% of the ceiling measured in the same run (copy BW or bf16 matmul)")
    ax.set_title(f"dpkern kernels, fastest backend per case ({gpu})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def readme_section(env: dict, rows: list, failed: list, run_rel: str, e2e: str | None) -> str:
    bf = {(r["op"], r["shape"], r["dtype"]): r for r in rows if r["ms"] is not None}
    head = [r for k, r in bf.items() if k[2] == "bf16" and k[1] in ("8x512x2048x2048", "4096x4096",
                                                                      "8x512x2048x32000")]
    lines = ["## Performance", "",
             f"Measured on one {env.get('gpu', '?')} (driver {env.get('driver', '?')}, torch "
             f"{env.get('torch', '?')}, triton {env.get('triton', '?')}, CUDA {env.get('cuda', '?')}), "
             f"commit {env.get('commit', '?')}; every case checked against its reference before "
             "timing; median of CUDA-event timings; ceilings (device copy bandwidth, dense bf16 "
             "matmul) measured at the start of the same run. Full table: "
             "[bench/results/perf/perf.md](bench/results/perf/perf.md); raw data: "
             f"`{run_rel}/bench.json`.", "",
             kernel_table(head) if rows else "No microbenchmark results in this run.", "",
             "![fraction of ceiling](bench/results/perf/perf.png)", ""]
    if failed:
        lines += [f"Not reported (failed in this run): {len(failed)} cases ("
                  + ", ".join(sorted({f.split('[')[0].replace('test_', '') for f in failed})) + ").", ""]
    if e2e:
        lines += ["End-to-end DP step (bench/e2e_step.py):", "", e2e, ""]
    else:
        lines += ["End-to-end step numbers (bench/e2e_step.py) are not in this run.", ""]
    lines += ["Reproduce on a GPU: `bash bench/gpu_all.sh`, then `python bench/perf_report.py "
              "--run $OUT` (see bench/README.md)."]
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="gpu_all.sh output folder (default: newest)")
    ap.add_argument("--e2e", default=None, help="e2e_step CSV (default: *.csv with 'e2e' in the run)")
    ap.add_argument("--out", default=str(RESULTS / "perf"))
    args = ap.parse_args(argv)
    runs = [Path(args.run)] if args.run else find_runs()
    if not runs:
        raise SystemExit("no run folder with bench.json + env.txt under bench/results")
    run = runs[-1]
    env = parse_env_txt(run / "env.txt")
    outcomes = outcomes_from_log(run / "bench.log")
    # A run whose harness was stopped before it wrote bench.json still reports its e2e table.
    have_bench = (run / "bench.json").exists()
    recs = records_from_bench_json(run / "bench.json", env, outcomes) if have_bench else []
    failed = [r["name"] for r in recs if not reportable(r)]
    rows = kernel_rows(recs)
    e2e_path = Path(args.e2e) if args.e2e else next(iter(sorted(run.rglob("*e2e*.csv"))), None)
    e2e = e2e_table(e2e_path) if e2e_path and e2e_path.exists() else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_rel = str(run.resolve().relative_to(ROOT)) if run.resolve().is_relative_to(ROOT) else str(run)
    others = other_rows(recs)
    md = [f"# dpkern performance: {env.get('gpu', '?')}", "",
          f"Run `{run_rel}` (commit {env.get('commit', '?')}, {env.get('date', '?')}; torch "
          f"{env.get('torch', '?')}, triton {env.get('triton', '?')}, driver {env.get('driver', '?')}).",
          "Fastest dpkern backend per case; `vs torch ref` = torch reference time / dpkern time; "
          "`time / non-private matmul` = book-keeping time over torch.matmul of the non-private "
          "weight gradient on the same shapes. Rates above 100% of the copy ceiling mean the "
          "case's byte model over-counts (e.g. state that is not read on the first step).", "",
          kernel_table(rows) if have_bench else "No microbenchmark results in this run "
          "(bench.json missing: the harness did not finish).", "", "## Noise, optimizer and denoising", "",
          "| case | median ms (IQR) | rate | % of copy BW |", "|---|---|---|---|"]
    md += [f"| {r['case']} | {r['ms']:.4f} ({_f(r['iqr_ms'], '.4f')}) | {r['rate']} | "
           f"{_f(r['frac'] and 100 * r['frac'], '.0f')} |" for r in others]
    if any(r.get("spread_source") for r in recs):
        md += ["", "IQR of this run: from the 20 synchronized host-timed rounds, scaled to the CUDA-event "
               "median (the run predates the per-sample IQR of the harness)."]
    md += ["", "## Failed cases (not reported)", ""] + [f"- {n}" for n in failed] + [""]
    if e2e:
        md += ["## End-to-end DP step", "", e2e, ""]
    (out / "perf.md").write_text("\n".join(md) + "\n")
    plot(rows, out / "perf.png", env.get("gpu", "?"))
    section = readme_section(env, rows, failed, run_rel, e2e)
    (out / "readme_section.md").write_text(section + "\n")
    print(section)
    return section


if __name__ == "__main__":
    main()
