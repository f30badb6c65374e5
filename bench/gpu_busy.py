"""Is a training step GPU-bound or launch-bound? For each mode and case of bench/e2e_step.py's
model: step time (CUDA events), host time until step() returned, and the GPU's busy time (the
union of kernel intervals from torch.profiler) over the same steps. busy / step near 1: the GPU is
the limit; well below 1 with host near step: the Python side (launches, hooks) is.

    python -m bench.gpu_busy --cases 16x256,8x512 --precisions bf16 --out busy.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.e2e_step import Runner, _parse_cases, case_inputs, free, llama_config


def busy_ms(prof) -> float:
    """Union of the GPU kernel/memcpy/memset intervals of a profile, in ms."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    total, cur_s, cur_e = 0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e3  # us -> ms


def measure(runner, cfg, precision, bsz, seq, steps, warmup) -> dict:
    ids, pos, amp = case_inputs(cfg, bsz, seq, precision)
    for _ in range(warmup):
        runner.step(ids, pos, amp)
    torch.cuda.synchronize()
    step, host = [], []
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t0 = time.perf_counter()
            runner.step(ids, pos, amp)
            host.append((time.perf_counter() - t0) * 1e3)
            b.record()
            torch.cuda.synchronize()
            step.append(a.elapsed_time(b))
    busy = busy_ms(prof) / steps
    return {"step_ms": statistics.median(step), "host_ms": statistics.median(host),
            "busy_ms": busy, "busy_frac": busy / statistics.mean(step),
            "steps_ms": step, "n_kernels": sum(1 for e in prof.events()
                                              if e.device_type == torch.autograd.DeviceType.CUDA)
            // steps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default="16x256,8x512,8x128")
    ap.add_argument("--precisions", default="bf16,fp32-tf32")
    ap.add_argument("--modes", default="nonprivate,dpkern")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="gpu_busy.json")
    args = ap.parse_args(argv)
    args.backend, args.sigma, args.clip = "triton", 1.0, 1.0
    cfg, cases, rows = llama_config(False), _parse_cases(args.cases), []
    for mode in args.modes.split(","):
        runner = Runner(cfg, "cuda", mode, args, expected_bsz=cases[0][0])
        for precision in args.precisions.split(","):
            for bsz, seq in cases:
                r = {"mode": mode, "precision": precision, "B": bsz, "T": seq}
                r.update(measure(runner, cfg, precision, bsz, seq, args.steps, args.warmup))
                print(f"{mode:10s} {precision:9s} {bsz}x{seq}: step {r['step_ms']:.1f} ms, host "
                      f"{r['host_ms']:.1f} ms, GPU busy {r['busy_ms']:.1f} ms "
                      f"({100 * r['busy_frac']:.0f}%), {r['n_kernels']} kernels", flush=True)
                rows.append(r)
                free("cuda")
        runner.close()
        del runner
        free("cuda")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
