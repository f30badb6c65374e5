"""Benchmark harness (pytest-benchmark).

Run: `pytest bench --benchmark-json=results.json`. On a GPU every case is timed with CUDA events
(median of many runs, via triton.testing.do_bench) and reported against ceilings measured at the start
of the same run: device copy bandwidth (bytes read + written) and dense bf16 matmul rate. Without a GPU
the suite runs in a quick correctness-only mode (torch backend, a couple of rounds, no ceilings).
A case checks its output against the reference before it is timed: a wrong kernel is never reported.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _median_ms(fn, warmup=25, rep=200):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


@pytest.fixture(scope="session")
def ceilings():
    """Measured once per run: {'copy_gbps': ..., 'bf16_tflops': ...} (empty without a GPU)."""
    if not HAS_GPU:
        return {}
    n = 1 << 28  # 1 GiB of fp32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b)
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "bf16_tflops": tflops, "gpu": torch.cuda.get_device_name()}


@pytest.fixture
def timed(benchmark, ceilings):
    """timed(fn, bytes_moved=..., flops=...): time fn, attach GB/s / TFLOP/s and ceilings to the JSON."""
    def run(fn, *, bytes_moved=0, flops=0):
        info = benchmark.extra_info
        if HAS_GPU:
            torch.cuda.reset_peak_memory_stats()
            ms = _median_ms(fn)
            info["median_ms"] = ms
            info["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
            if bytes_moved:
                info["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
                info["copy_gbps"] = ceilings["copy_gbps"]
                info["frac_of_copy_bw"] = info["gbps"] / ceilings["copy_gbps"]
            if flops:
                info["tflops"] = flops / (ms * 1e-3) / 1e12
                info["bf16_tflops"] = ceilings["bf16_tflops"]
            info["gpu"] = ceilings["gpu"]

            def synced():
                fn()
                torch.cuda.synchronize()
            benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=2)
        else:
            benchmark.pedantic(fn, rounds=2, iterations=1)
        return info
    return run
