"""Compare the benchmark cases at a base commit with the current tree: a table of time ratios.

    python bench/compare.py --base main~5                       # GPU: full cases, both trees
    python bench/compare.py --base HEAD --quick -k rownorm      # CPU quick mode (correctness only)

The base commit is checked out with `git worktree add --detach` into a temporary folder (removed at
the end). By default the *current* bench harness (bench/*.py: registry, conftest, cases) is copied
into the base tree, so both sides run the same cases on their own library code; `--base-bench`
runs the base commit's own bench files instead. Each side runs `pytest` in a subprocess with its
tree first on PYTHONPATH (the compiled CUDA extension is not rebuilt for the base: there its
"cuda" cases fall back or fail and are shown as such).

A ratio (base / current median time, > 1 = faster now) is printed only when the case passed and
its correctness check did not fail on both sides; otherwise the row says why (FAIL, missing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.history import records_from_bench_json, reportable  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def junit_outcomes(xml_path) -> dict:
    """{test name: passed | failed | skipped} from a pytest junit XML."""
    out = {}
    p = Path(xml_path)
    if not p.exists():
        return out
    for tc in ET.parse(p).getroot().iter("testcase"):
        kids = {c.tag for c in tc}
        status = ("failed" if kids & {"failure", "error"} else
                  "skipped" if "skipped" in kids else "passed")
        out[tc.get("name")] = status
    return out


def run_side(tree: Path, paths: list, out_dir: Path, quick: bool, kexpr: str | None,
             timeout: int) -> list:
    """Run the bench cases in `tree`; returns history-style records (bench/history.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bj, xml = out_dir / "bench.json", out_dir / "junit.xml"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("DPKERN_BENCH_HISTORY", None)
    if quick:
        env["DPKERN_BENCH_QUICK"] = "1"
        env.setdefault("TRITON_INTERPRET", "1")
    cmd = [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={bj}", f"--junitxml={xml}", f"--rootdir={tree}"]
    if kexpr:
        cmd += ["-k", kexpr]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    (out_dir / "pytest.log").write_text(proc.stdout + proc.stderr)
    outcomes = junit_outcomes(xml)
    if not bj.exists():
        return [{"name": n, "status": s, "correct": None} for n, s in outcomes.items()]
    return records_from_bench_json(bj, {"tree": str(tree)}, outcomes)


def ratio_rows(base: list, head: list) -> list[dict]:
    """One row per case name in either side: base / head medians and the ratio when both are
    reportable (a failed or mis-checked case never shows a speed-up)."""
    b = {r["name"]: r for r in base}
    h = {r["name"]: r for r in head}
    rows = []
    for name in list(dict.fromkeys([*h, *b])):
        rb, rh = b.get(name), h.get(name)
        row = {"name": name, "base_ms": rb and rb.get("median_ms"), "head_ms": rh and rh.get("median_ms"),
               "ratio": None, "note": ""}
        if rb is None or rh is None:
            row["note"] = "only at " + ("head" if rb is None else "base")
        elif not reportable(rb) or not reportable(rh):
            bad = [side for side, r in (("base", rb), ("head", rh)) if not reportable(r)]
            what = {s: (r.get("status") if r.get("status") != "passed" else "check failed")
                    for s, r in (("base", rb), ("head", rh))}
            row["note"] = "FAIL " + ", ".join(f"{s}: {what[s]}" for s in bad)
            if all(r.get("status") == "skipped" for r in (rb, rh)):
                row["note"] = "skipped"
        elif row["base_ms"] and row["head_ms"]:
            row["ratio"] = row["base_ms"] / row["head_ms"]
        rows.append(row)
    return rows


def format_table(rows: list, base_label: str, quick: bool) -> str:
    w = max([len(r["name"]) for r in rows] + [4])
    lines = [f"{'case':<{w}}  {'base ms':>10}  {'head ms':>10}  {'base/head':>9}  note",
             "-" * (w + 46)]
    for r in rows:
        f = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"{r['name']:<{w}}  {f(r['base_ms']):>10}  {f(r['head_ms']):>10}  {ratio:>9}  "
                     f"{r['note']}")
    lines.append(f"base = {base_label}; head = working tree; base/head > 1: faster now."
                 + (" QUICK MODE (CPU, 2 rounds): ratios are not performance claims." if quick else ""))
    return "\n".join(lines)


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="base revision (e.g. main~5, a commit, HEAD)")
    ap.add_argument("--quick", action="store_true", help="CPU correctness-only mode (default "
                    "without a GPU)")
    ap.add_argument("-k", dest="kexpr", default=None, help="pytest -k expression to select cases")
    ap.add_argument("--paths", nargs="*", default=["bench"], help="bench paths (default bench)")
    ap.add_argument("--base-bench", action="store_true",
                    help="use the base commit's own bench files (default: the current ones)")
    ap.add_argument("--out", default=None, help="folder for both sides' JSON/logs + compare.json")
    ap.add_argument("--timeout", type=int, default=1800, help="per side, seconds")
    args = ap.parse_args(argv)
    import torch
    quick = args.quick or not torch.cuda.is_available()
    rev = subprocess.run(["git", "rev-parse", "--verify", args.base + "^{commit}"], cwd=ROOT,
                         capture_output=True, text=True)
    if rev.returncode:
        raise SystemExit(f"--base: unknown revision {args.base!r}: {rev.stderr.strip()}")
    sha = rev.stdout.strip()
    out = Path(args.out or tempfile.mkdtemp(prefix="dpkern_compare_"))
    tmp = Path(tempfile.mkdtemp(prefix="dpkern_base_"))
    wt = tmp / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(wt), sha], cwd=ROOT,
                   check=True, capture_output=True)
    try:
        # kernels/ installs as dpkern.kernels: make the base's own kernels importable from its tree
        if (wt / "kernels").is_dir() and not (wt / "dpkern" / "kernels").exists():
            (wt / "dpkern" / "kernels").symlink_to(wt / "kernels", target_is_directory=True)
        if not args.base_bench:  # the same cases on both sides: the current harness
            for f in (ROOT / "bench").glob("*.py"):
                shutil.copy2(f, wt / "bench" / f.name)
        base = run_side(wt, args.paths, out / "base", quick, args.kexpr, args.timeout)
        head = run_side(ROOT, args.paths, out / "head", quick, args.kexpr, args.timeout)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT,
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = ratio_rows(base, head)
    label = f"{args.base} ({sha[:10]})"
    text = format_table(rows, label, quick)
    print(text)
    (out / "compare.txt").write_text(text + "\n")
    (out / "compare.json").write_text(json.dumps({"base": sha, "base_label": args.base,
                                                  "quick": quick, "rows": rows}, indent=1))
    print(f"results: {out}")
    return rows


if __name__ == "__main__":
    main()
