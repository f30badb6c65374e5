"""Benchmark harness (pytest-benchmark).

Run: `pytest bench --benchmark-json=results.json`. Shapes come from bench/registry.py. On a GPU
every case is timed with CUDA events (all samples of triton.testing.do_bench: median and IQR) and
reported against ceilings measured at the start of the same run: device copy bandwidth (bytes read +
written) and dense bf16 matmul rate; peak memory is recorded. Without a GPU (or with
DPKERN_BENCH_QUICK=1) the suite runs in a quick correctness-only mode (CPU, small shapes, a couple
of rounds; times are not claims).

Correctness: a case checks its output against the reference before it is timed, either by asserting
before calling `timed` or by passing `check=`; a failed check marks the case (correct = false) and
fails the test, so it is never timed nor reported as a speed-up. `baseline=True` marks a reference
baseline with nothing to check (correct = null).

Time budget: with DPKERN_BENCH_DEADLINE=<unix time> (set by `make bench-gpu`), cases that would
start after it are skipped with that reason (and recorded as skipped), so one call fits its limit;
the cases run in registry order.

History: with DPKERN_BENCH_HISTORY=path.jsonl every case of the session (passed, failed or skipped)
is appended there with the run's GPU, driver, versions, commit, date and ceilings (bench/history.py).
"""
import os
import time

import pytest
import torch

from bench.registry import DEVICE, QUICK

HAS_GPU = not QUICK
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_RESULTS: dict = {}      # nodeid -> extra_info of the case (filled by `timed`)
_OUTCOMES: dict = {}     # nodeid -> "passed" | "failed" | "skipped"
_CEILINGS: dict = {}


def _median_ms(fn, warmup=25, rep=200):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


@pytest.fixture(scope="session")
def ceilings():
    """Measured once per run: {'copy_gbps', 'bf16_tflops', 'gpu'} (empty in quick mode)."""
    if not HAS_GPU:
        return {}
    from bench.history import measure_ceilings
    _CEILINGS.update(measure_ceilings(DEVICE))
    return dict(_CEILINGS)


@pytest.fixture
def timed(benchmark, ceilings, request):
    """timed(fn, bytes_moved=..., flops=..., check=None, baseline=False): check, then time fn;
    attach median / IQR / GB/s / TFLOP/s against the ceilings / peak memory to the JSON."""
    def run(fn, *, bytes_moved=0, flops=0, check=None, baseline=False):
        info = benchmark.extra_info
        _RESULTS[request.node.nodeid] = info
        info["correct"] = None if baseline else True
        if check is not None:
            try:
                check()
            except Exception as exc:
                info["correct"] = False
                info["check_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                raise
        if HAS_GPU:
            from bench.history import spread
            import triton.testing
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()  # peak memory of one call (inputs included), before do_bench's L2-flush buffer
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            times = list(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="all"))
            s = spread(times)
            ms = s["median_ms"]
            info.update(median_ms=ms, q1_ms=s["q1_ms"], q3_ms=s["q3_ms"], iqr_ms=s["iqr_ms"],
                        peak_mem_bytes=peak)
            if bytes_moved:
                info["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
                info["copy_gbps"] = ceilings["copy_gbps"]
                info["frac_of_copy_bw"] = info["frac_of_ceiling"] = info["gbps"] / ceilings["copy_gbps"]
            if flops:
                info["tflops"] = flops / (ms * 1e-3) / 1e12
                info["bf16_tflops"] = ceilings["bf16_tflops"]
                info["frac_of_ceiling"] = info["tflops"] / ceilings["bf16_tflops"]
            info["gpu"] = ceilings["gpu"]

            def synced():
                fn()
                torch.cuda.synchronize()
            benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=2)
        else:
            info["quick"] = True
            benchmark.pedantic(fn, rounds=2, iterations=1)
            st = benchmark.stats.stats  # host timer, 2 rounds: not a claim
            info.update(median_ms=st.median * 1e3, q1_ms=st.q1 * 1e3, q3_ms=st.q3 * 1e3,
                        iqr_ms=st.iqr * 1e3)
        return info
    return run


def pytest_runtest_setup(item):
    deadline = os.environ.get("DPKERN_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("time budget of this run spent (DPKERN_BENCH_DEADLINE)")


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _OUTCOMES[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("DPKERN_BENCH_HISTORY")
    if not path or not _OUTCOMES:
        return
    from bench.history import TIMING_KEYS, append, run_env
    run = run_env(_CEILINGS, QUICK)
    recs = []
    for nodeid, outcome in _OUTCOMES.items():
        info = _RESULTS.get(nodeid, {})
        rec = {"run": run, "name": nodeid.split("::")[-1], "fullname": nodeid, "status": outcome,
               "correct": info.get("correct", False if outcome == "failed" else None),
               **{k: info.get(k) for k in ("op", "backend", "dtype", "shape", "check_error")
                  if k in info}}
        rec.update({k: info[k] for k in TIMING_KEYS if k in info})
        recs.append(rec)
    append(path, recs)
