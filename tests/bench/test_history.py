"""History records: environment, spread, bench.json import, the timed fixture's correctness mark."""
import json
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest

from bench import history
from bench.compare import ratio_rows

ROOT = Path(__file__).resolve().parents[2]
RUN2 = ROOT / "bench" / "results" / "gpu_run2_h100"


def test_spread_quartiles():
    s = history.spread([5.0, 1.0, 2.0, 4.0, 3.0])
    assert (s["median_ms"], s["q1_ms"], s["q3_ms"], s["iqr_ms"]) == (3.0, 2.0, 4.0, 2.0)
    assert history.spread([7.0])["iqr_ms"] == 0.0


def test_run_env_fields():
    env = history.run_env({"copy_gbps": 1.0}, quick=True)
    for k in ("gpu", "driver", "torch", "triton", "cuda", "commit", "date", "quick", "ceilings"):
        assert k in env
    assert env["torch"] and env["date"][:2] == "20" and env["ceilings"] == {"copy_gbps": 1.0}


def test_append_load_roundtrip(tmp_path):
    p = tmp_path / "h.jsonl"
    history.append(p, [{"name": "a", "status": "passed"}])
    history.append(p, [{"name": "b", "status": "failed"}])
    assert [r["name"] for r in history.load(p)] == ["a", "b"]
    assert history.load(tmp_path / "missing.jsonl") == []


def _bench_json(tmp_path, entries):
    data = {"benchmarks": [{"name": n, "fullname": "f::" + n, "extra_info": e,
                            "stats": {"median": 2e-3, "q1": 1e-3, "q3": 3e-3, "iqr": 2e-3}}
                           for n, e in entries]}
    p = tmp_path / "bench.json"
    p.write_text(json.dumps(data))
    return p


def test_records_from_bench_json(tmp_path):
    p = _bench_json(tmp_path, [
        ("gpu_case", {"op": "x", "backend": "triton", "median_ms": 1.0, "iqr_ms": 0.1,
                      "gbps": 10.0, "frac_of_copy_bw": 0.5}),
        ("cpu_case", {"op": "x", "backend": "torch"}),
        ("bad_check", {"op": "x", "backend": "cuda", "median_ms": 0.1, "correct": False}),
        ("failed_later", {"op": "x", "backend": "cuda", "median_ms": 0.1})])
    recs = {r["name"]: r for r in history.records_from_bench_json(
        p, {"gpu": "G"}, {"failed_later": "failed", "never_timed": "failed"})}
    assert recs["gpu_case"]["median_ms"] == 1.0 and recs["gpu_case"]["frac_of_ceiling"] == 0.5
    assert recs["cpu_case"]["median_ms"] == pytest.approx(2.0)      # host stats fallback
    assert recs["cpu_case"]["iqr_ms"] == pytest.approx(2.0)
    assert history.reportable(recs["gpu_case"]) and history.reportable(recs["cpu_case"])
    assert not history.reportable(recs["bad_check"])
    assert not history.reportable(recs["failed_later"])
    assert recs["never_timed"]["status"] == "failed" and not history.reportable(recs["never_timed"])
    assert recs["gpu_case"]["run"] == {"gpu": "G"}


def test_import_gpu_run(tmp_path):
    env = history.parse_env_txt(RUN2 / "env.txt")
    assert env["gpu"] == "NVIDIA H100 80GB HBM3" and env["driver"] == "580.159.04"
    assert env["torch"].startswith("2.11") and env["triton"] == "3.6.0" and env["commit"] == "61de4f0"
    to = tmp_path / "h.jsonl"
    assert history.import_run(RUN2, to) == 152
    assert history.import_run(RUN2, to) == 0                       # idempotent
    recs = history.load(to)
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(failed) == 16 and not any(history.reportable(r) for r in failed)
    ok = [r for r in recs if r.get("op") == "rownorm_sq"]
    assert all(r["iqr_ms"] >= 0 and r["median_ms"] > 0 and r["run"]["gpu"] for r in ok)


CASES = '''
def test_ok(timed):
    timed(lambda: sum(range(100)), check=lambda: None)

def test_wrong(timed):
    def check():
        raise AssertionError("kernel disagrees with reference")
    timed(lambda: None, check=check)

def test_base(timed):
    timed(lambda: None, baseline=True)
'''


def test_timed_fixture_marks_and_history(tmp_path):
    """Through bench/conftest.py as a plugin: a failing check fails the case, marks it
    correct=false in the history and it is never shown as a speed-up."""
    (tmp_path / "test_cases.py").write_text(CASES)
    hist, bj = tmp_path / "h.jsonl", tmp_path / "b.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DPKERN_BENCH_QUICK="1", DPKERN_BENCH_HISTORY=str(hist))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "bench.conftest", "-q",
                           "-p", "no:cacheprovider", str(tmp_path / "test_cases.py"),
                           f"--benchmark-json={bj}", f"--rootdir={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr         # test_wrong fails
    recs = {r["name"]: r for r in history.load(hist)}
    assert set(recs) == {"test_ok", "test_wrong", "test_base"}
    assert recs["test_ok"]["status"] == "passed" and recs["test_ok"]["correct"] is True
    assert recs["test_ok"]["median_ms"] > 0 and recs["test_ok"]["run"]["quick"] is True
    assert recs["test_wrong"]["status"] == "failed" and recs["test_wrong"]["correct"] is False
    assert "disagrees" in recs["test_wrong"]["check_error"] and "median_ms" not in recs["test_wrong"]
    assert recs["test_base"]["correct"] is None and history.reportable(recs["test_base"])
    timed_names = {b["name"] for b in json.loads(bj.read_text())["benchmarks"]}
    assert "test_wrong" not in timed_names
    # even if the wrong case were "faster", the comparison shows no ratio for it
    base = [dict(r, status="passed", correct=True, median_ms=10.0) for r in recs.values()]
    rows = {r["name"]: r for r in ratio_rows(base, list(recs.values()))}
    assert rows["test_wrong"]["ratio"] is None and rows["test_wrong"]["note"].startswith("FAIL")
    assert rows["test_ok"]["ratio"] is not None


def test_deadline_skips_the_cases_past_it(tmp_path):
    """DPKERN_BENCH_DEADLINE in the past: every case is skipped with the budget as its reason and
    recorded as skipped (never as passed); in the future: the cases run."""
    (tmp_path / "test_cases.py").write_text(CASES)
    for deadline, want in ((time.time() - 1, "skipped"), (time.time() + 3600, None)):
        hist = tmp_path / f"h{want}.jsonl"
        env = dict(os.environ, PYTHONPATH=str(ROOT), DPKERN_BENCH_QUICK="1",
                   DPKERN_BENCH_HISTORY=str(hist), DPKERN_BENCH_DEADLINE=str(deadline))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "bench.conftest", "-q", "-rs",
                               "-p", "no:cacheprovider", str(tmp_path / "test_cases.py"),
                               f"--rootdir={tmp_path}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        recs = {r["name"]: r["status"] for r in history.load(hist)}
        if want == "skipped":
            assert proc.returncode == 0 and set(recs.values()) == {"skipped"}, recs
            assert "time budget of this run spent" in proc.stdout
        else:
            assert recs["test_ok"] == "passed" and recs["test_wrong"] == "failed"


def test_merge_is_idempotent(tmp_path):
    src, to = tmp_path / "run.jsonl", tmp_path / "all.jsonl"
    run = {"date": "2026-11-23T00:00:00+00:00", "commit": "abc"}
    history.append(src, [{"run": run, "name": "a", "status": "passed"},
                         {"run": run, "name": "b", "status": "failed"}])
    assert history.merge(src, to) == 2
    assert history.merge(src, to) == 0
    assert len(history.load(to)) == 2
