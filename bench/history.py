"""Benchmark history: one JSON line per case and run, with the machine and software it ran on.

A record: {"run": {gpu, driver, torch, triton, cuda, python, commit, dirty, date, host, quick,
ceilings}, "name", "op", "backend", "dtype", "shape", "status" ("passed" | "failed" | "skipped"),
"correct" (true: checked against the reference before timing; false: the check failed; null: a
baseline with nothing to check), "median_ms", "q1_ms", "q3_ms", "iqr_ms", "gbps", "tflops",
"frac_of_ceiling", "peak_mem_bytes"}.

A record is *reportable* (may appear as a speed-up) only when status == "passed" and correct is not
false. compare.py and perf_report.py use `reportable`.

    python bench/history.py import RUN_DIR [--to bench/results/history.jsonl]   # a gpu_all.sh run
    python bench/history.py merge RUN_DIR/history.jsonl      # a run's own DPKERN_BENCH_HISTORY file
    python bench/history.py show [--file bench/results/history.jsonl]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = ROOT / "bench" / "results" / "history.jsonl"
TIMING_KEYS = ("median_ms", "q1_ms", "q3_ms", "iqr_ms", "gbps", "tflops", "frac_of_ceiling",
               "peak_mem_bytes", "copy_gbps", "bf16_tflops")


def git_commit(cwd=ROOT) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the tree at cwd; DPKERN_COMMIT wins (the GPU machine has no .git)."""
    env = os.environ.get("DPKERN_COMMIT")
    if env:
        return env, None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True).stdout.strip() != ""
        return rev, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def run_env(ceilings: dict | None = None, quick: bool | None = None) -> dict:
    """The machine and software of this run."""
    import torch
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    gpu = driver = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = None
    commit, dirty = git_commit()
    if quick is None:
        from bench.registry import QUICK as quick
    return {"gpu": gpu, "driver": driver, "torch": torch.__version__, "triton": triton_v,
            "cuda": torch.version.cuda, "python": platform.python_version(), "commit": commit,
            "dirty": dirty, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "host": platform.node(), "quick": bool(quick),
            "ceilings": dict(ceilings or {})}


def measure_ceilings(device: str, quick: bool = False) -> dict:
    """Device copy bandwidth (GB/s, bytes read + written) and dense matmul rate (TFLOP/s; bf16 on a
    GPU, fp32 on the CPU), measured now. Quick mode uses small sizes (a smoke value, not a ceiling)."""
    import torch
    n = (1 << 22) if quick else (1 << 28)
    m = 256 if quick else 8192
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dt = torch.bfloat16 if device != "cpu" else torch.float32
    a = torch.randn(m, m, device=device, dtype=dt)
    b = torch.randn(m, m, device=device, dtype=dt)
    copy_ms = time_ms(lambda: dst.copy_(src), device, quick)["median_ms"]
    mm_ms = time_ms(lambda: a @ b, device, quick)["median_ms"]
    out = {"copy_gbps": 2 * n * 4 / (copy_ms * 1e-3) / 1e9,
           ("bf16_tflops" if dt == torch.bfloat16 else "fp32_tflops"): 2 * m**3 / (mm_ms * 1e-3) / 1e12}
    if device != "cpu":
        out["gpu"] = torch.cuda.get_device_name()
        del src, dst, a, b
        torch.cuda.empty_cache()
    return out


def spread(times_ms: list) -> dict:
    """median, quartiles and IQR of a list of times (ms)."""
    import statistics
    xs = sorted(times_ms)
    if len(xs) < 2:
        v = xs[0] if xs else float("nan")
        return {"median_ms": v, "q1_ms": v, "q3_ms": v, "iqr_ms": 0.0, "n": len(xs)}
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "n": len(xs)}


def time_ms(fn, device: str, quick: bool = False, warmup: int = 25, rep: int = 200) -> dict:
    """Time fn: CUDA events through triton.testing.do_bench (all samples) on a GPU, perf_counter
    on the CPU (a few runs in quick mode). Returns spread()."""
    if device != "cpu":
        import triton.testing
        return spread(list(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="all")))
    import time
    fn()
    out = []
    for _ in range(3 if quick else 20):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return spread(out)


def reportable(rec: dict) -> bool:
    """May this record be shown as a speed-up? Only a passed case whose check did not fail."""
    return rec.get("status") == "passed" and rec.get("correct") is not False


def append(path, records: list) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, default=str, sort_keys=True) + "\n")


def load(path) -> list:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse_env_txt(path) -> dict:
    """The env.txt of a gpu_all.sh run: date, commit, GPU name, driver, torch/triton/cuda."""
    out: dict = {}
    p = Path(path)
    if not p.exists():
        return out
    lines = p.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("commit "):
            out["commit"] = line.split()[1]
        elif line.startswith("name,") and i + 1 < len(lines):
            parts = [s.strip() for s in lines[i + 1].split(",")]
            out["gpu"], out["driver"] = parts[0], parts[1] if len(parts) > 1 else None
        elif line.startswith("torch "):
            m = re.findall(r"(torch|triton|cuda) (\S+)", line)
            out.update(dict(m))
    if lines:
        out["date"] = lines[0].strip()
    return out


def records_from_bench_json(bench_json, env: dict | None = None, outcomes: dict | None = None) -> list:
    """History records from a pytest-benchmark JSON. outcomes: {test name: status} (from a junit
    XML or the run's log); names missing from the JSON but listed there as failed are added too."""
    data = json.loads(Path(bench_json).read_text())
    run = dict(env or {})
    recs = []
    seen = set()
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        name = b["name"]
        seen.add(name)
        rec = {"run": run, "name": name, "fullname": b.get("fullname", name),
               "op": e.get("op"), "backend": e.get("backend"), "dtype": e.get("dtype"),
               "shape": e.get("shape"), "status": (outcomes or {}).get(name, "passed"),
               "correct": e.get("correct", True if e.get("op") else None)}
        if "median_ms" not in e:  # quick mode / CPU: pytest-benchmark's own (host) statistics
            st = b["stats"]
            e = dict(e, median_ms=st["median"] * 1e3, q1_ms=st["q1"] * 1e3, q3_ms=st["q3"] * 1e3,
                     iqr_ms=st["iqr"] * 1e3)
        elif "iqr_ms" not in e:  # older runs: spread of the synced host rounds, scaled to the median
            st = b["stats"]
            k = e["median_ms"] / (st["median"] * 1e3) if st["median"] else 1.0
            e = dict(e, q1_ms=st["q1"] * 1e3 * k, q3_ms=st["q3"] * 1e3 * k, iqr_ms=st["iqr"] * 1e3 * k,
                     spread_source="host rounds (scaled)")
        for k in TIMING_KEYS + ("spread_source",):
            if k in e:
                rec[k] = e[k]
        if "frac_of_ceiling" not in rec:
            if "frac_of_copy_bw" in e:
                rec["frac_of_ceiling"] = e["frac_of_copy_bw"]
            elif "tflops" in e and e.get("bf16_tflops"):
                rec["frac_of_ceiling"] = e["tflops"] / e["bf16_tflops"]
        recs.append(rec)
    for name, status in (outcomes or {}).items():
        if name not in seen and status == "failed":
            recs.append({"run": run, "name": name, "status": "failed", "correct": False})
    return recs


def outcomes_from_log(log_path) -> dict:
    """{test name: 'failed'} from the 'FAILED path::name' lines of a pytest log."""
    out = {}
    p = Path(log_path)
    if p.exists():
        for m in re.finditer(r"^FAILED \S+::(\S+)", p.read_text(), re.M):
            out[m.group(1)] = "failed"
    return out


def import_run(run_dir, to=DEFAULT_FILE) -> int:
    """Append a gpu_all.sh run folder (bench.json, env.txt, bench.log) to the history file."""
    run_dir = Path(run_dir).resolve()
    env = parse_env_txt(run_dir / "env.txt")
    env.update(source=str(run_dir.relative_to(ROOT) if run_dir.resolve().is_relative_to(ROOT)
                          else run_dir), quick=False)
    recs = records_from_bench_json(run_dir / "bench.json", env, outcomes_from_log(run_dir / "bench.log"))
    existing = {(r["run"].get("source"), r["name"]) for r in load(to)}
    new = [r for r in recs if (env["source"], r["name"]) not in existing]
    append(to, new)
    return len(new)


def merge(src, to=DEFAULT_FILE) -> int:
    """Append the records of another history file that `to` does not hold yet (by run date,
    commit and case)."""
    key = lambda r: (r["run"].get("date"), r["run"].get("commit"), r.get("fullname", r["name"]))  # noqa: E731
    have = {key(r) for r in load(to)}
    new = [r for r in load(src) if key(r) not in have]
    append(to, new)
    return len(new)


def main(argv=None):
    ap = argparse.ArgumentParser(description="benchmark history (JSONL)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("import", help="append a gpu_all.sh run folder")
    a.add_argument("run_dir")
    a.add_argument("--to", default=str(DEFAULT_FILE))
    m = sub.add_parser("merge", help="append a run's own history JSONL (DPKERN_BENCH_HISTORY)")
    m.add_argument("jsonl")
    m.add_argument("--to", default=str(DEFAULT_FILE))
    s = sub.add_parser("show", help="print the last records")
    s.add_argument("--file", default=str(DEFAULT_FILE))
    s.add_argument("-n", type=int, default=20)
    args = ap.parse_args(argv)
    if args.cmd == "import":
        print(f"{import_run(args.run_dir, args.to)} records appended to {args.to}")
    elif args.cmd == "merge":
        print(f"{merge(args.jsonl, args.to)} records appended to {args.to}")
    else:
        for r in load(args.file)[-args.n:]:
            run = r["run"]
            ms = r.get("median_ms")
            print(f"{run.get('date', '')[:19]:<19} {str(run.get('commit'))[:8]:<8} "
                  f"{str(run.get('gpu') or 'cpu'):<22} {r['name']:<60} {r['status']:<7} "
                  f"{'' if ms is None else f'{ms:.4f} ms'}")


if __name__ == "__main__":
    main()
