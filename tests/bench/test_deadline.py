"""The harness's time budget (DPKERN_BENCH_DEADLINE, set by `make bench-gpu`): cases that would start
after it are skipped and recorded as skipped in the history, never dropped or shown as timed."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_bench(tmp_path, deadline):
    # torch cases only: quick mode runs Triton under the interpreter, which the GPU machine's numpy
    # (>= 2.4) does not support.
    hist = tmp_path / "history.jsonl"
    env = dict(os.environ, DPKERN_BENCH_QUICK="1", TRITON_INTERPRET="1",
               DPKERN_BENCH_DEADLINE=str(deadline), DPKERN_BENCH_HISTORY=str(hist))
    r = subprocess.run([sys.executable, "-m", "pytest", "bench/bench_rownorm.py", "-q",
                        "-p", "no:cacheprovider", "-rs", "-k", "test_rownorm_bench and not triton",
                        f"--benchmark-json={tmp_path / 'bench.json'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    recs = [json.loads(line) for line in hist.read_text().splitlines()]
    return r, recs


def test_past_deadline_skips_every_case_and_records_it(tmp_path):
    r, recs = _run_bench(tmp_path, time.time() - 1)
    assert r.returncode == 0, r.stdout[-2000:]
    assert recs and {x["status"] for x in recs} == {"skipped"}
    assert all("median_ms" not in x for x in recs)
    assert "time budget of this run spent" in r.stdout


def test_future_deadline_runs_the_cases(tmp_path):
    r, recs = _run_bench(tmp_path, time.time() + 3600)
    assert r.returncode == 0, r.stdout[-2000:]
    assert recs and {x["status"] for x in recs} == {"passed"}
    assert all(x["median_ms"] > 0 for x in recs)
