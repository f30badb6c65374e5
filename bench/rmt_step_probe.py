"""Where the RMT-denoised DP step's extra time goes (issue 8): the optimizer step of the DP step
with and without `RMTDenoiser`, split into host and GPU time, on bench/e2e_step.py's 1B model.

    python -m bench.rmt_step_probe --case 8x512 --precision bf16 --out /tmp/rmt_probe

For each mode (--modes, default dpkern,dpkern-rmt) after --warmup steps, per step:
* fwd_bwd_host / fwd_bwd_wall: host ms to issue forward + backward, and until the GPU is done;
* step_host: host ms to issue optimizer.step() (GPU idle when it starts, not waited for);
* step_wall: until the GPU has finished it; step_kernels: summed CUDA kernel time of one
  profiled optimizer.step() (torch.profiler), with its top kernels;
* denoise_host / denoise_wall: the same for the post-processor call alone (dpkern-rmt);
* allocator: deltas of torch.cuda.memory_stats counters over the timed steps (device
  allocations / frees and allocation retries: each retry frees cached blocks, which synchronises).
A step whose step_host exceeds step_kernels is host-bound: what the denoiser adds to it is its
host time, not its GPU time. Writes probe.json under --out and prints one line per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench.e2e_step import Runner, _parse_cases, case_inputs, free, llama_config
from bench.subspace_probe import cuda_kernels

ALLOC_KEYS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def _timed_post(opt, rec):
    """Wrap each post-processor so its host and wall ms are appended to rec."""
    def wrap(post):
        def call(grads, std):
            torch.cuda.synchronize()          # measurement only: GPU idle when the call starts
            t0 = time.perf_counter()
            post(grads, std)
            rec["denoise_host"].append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
            rec["denoise_wall"].append((time.perf_counter() - t0) * 1e3)
        return call
    opt.grad_postprocessors = [wrap(p) for p in opt.grad_postprocessors]


def probe_mode(runner, ids, pos, amp, steps, warmup) -> dict:
    for _ in range(warmup):
        runner.step(ids, pos, amp)
    rec = {k: [] for k in ("fwd_bwd_host", "fwd_bwd_wall", "step_host", "step_wall",
                           "denoise_host", "denoise_wall")}
    stats0 = torch.cuda.memory_stats()
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            loss = runner.model(input_ids=ids, position_ids=pos, labels=ids).loss * runner.loss_scale
        loss.backward()
        rec["fwd_bwd_host"].append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        rec["fwd_bwd_wall"].append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        runner.opt.step()
        rec["step_host"].append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        rec["step_wall"].append((time.perf_counter() - t0) * 1e3)
        runner.opt.zero_grad(set_to_none=True)
    stats1 = torch.cuda.memory_stats()
    out = {k: statistics.median(v) for k, v in rec.items() if v}
    out["allocator"] = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in ALLOC_KEYS}
    # the denoised call separately, GPU idle at its start (it adds a sync around the call)
    if runner.opt.grad_postprocessors:
        posts = runner.opt.grad_postprocessors
        _timed_post(runner.opt, rec)
        for _ in range(steps):
            runner.step(ids, pos, amp)
        runner.opt.grad_postprocessors = posts
        out["denoise_host"] = statistics.median(rec["denoise_host"])
        out["denoise_wall"] = statistics.median(rec["denoise_wall"])
    # kernel time of one optimizer step
    from torch.profiler import ProfilerActivity, profile
    with amp:
        loss = runner.model(input_ids=ids, position_ids=pos, labels=ids).loss * runner.loss_scale
    loss.backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.opt.step()
        torch.cuda.synchronize()
    runner.opt.zero_grad(set_to_none=True)
    evs = cuda_kernels(prof)
    out["step_kernels"] = sum(e.self_device_time_total for e in evs) / 1e3
    out["step_launches"] = sum(e.count for e in evs)
    out["top_kernels"] = [(e.key[:110], e.count, round(e.self_device_time_total / 1e3, 3))
                          for e in evs[:40]]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--case", default="8x512")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32-tf32"))
    ap.add_argument("--modes", default="dpkern,dpkern-rmt")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="rmt_probe")
    args = ap.parse_args(argv)
    args.backend, args.sigma, args.clip = "triton", 1.0, 1.0
    cfg = llama_config(False)
    (bsz, seq), = _parse_cases(args.case)
    ids, pos, amp = case_inputs(cfg, bsz, seq, args.precision)
    os.makedirs(args.out, exist_ok=True)
    report = {"case": args.case, "precision": args.precision, "gpu": torch.cuda.get_device_name(),
              "commit": os.environ.get("DPKERN_COMMIT", "unknown"), "modes": {}}
    for mode in args.modes.split(","):
        runner = Runner(cfg, "cuda", mode, args, expected_bsz=bsz)
        res = report["modes"][mode] = probe_mode(runner, ids, pos, amp, args.steps, args.warmup)
        print(f"{mode} {args.precision} {args.case}: " + ", ".join(
            f"{k} {v:.1f}" for k, v in res.items() if isinstance(v, float)) +
            f"; launches {res['step_launches']}; allocator {res['allocator']}", flush=True)
        runner.close()
        del runner
        free("cuda")
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
