"""Where the DP-SFT projected step's time goes on the GPU, and what the projection could cost.

    python bench/subspace_probe.py --out /tmp/probe            # GPU (1B Llama, bf16 8x512)

Writes probe.json and probe.txt under --out:

* proj: subspace_project at the 1B model's layer shapes (B, T) = (8, 512), r = 16 and 64: the
  Triton kernel at its heuristic config and at other token tiles / splits, and a cuBLAS form
  ((g U), (a V) as two GEMMs with fp32 output, then a batched r×r product), each in ms and in GB/s
  of the a and g bytes it must read (the floor is one read of each);
* steps: full DP step vs subspace-16 / subspace-64, median ms over --steps, host time to issue a
  step (perf_counter until the last launch returns) and the top CUDA kernels of one profiled step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"qkvo": (2048, 2048), "gate_up": (2048, 5632), "down": (5632, 2048),
          "lm_head": (2048, 32000)}  # (d, p)


def _time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(reps):
        fn()
    ev[1].record()
    torch.cuda.synchronize()
    return ev[0].elapsed_time(ev[1]) / reps


def _cublas_project(a, g, u, v):
    bsz, seq, d = a.shape
    p = g.shape[2]
    g2, a2 = g.reshape(-1, p), a.reshape(-1, d)
    try:
        gu = torch.mm(g2, u.to(g.dtype), out_dtype=torch.float32)
        av = torch.mm(a2, v.to(a.dtype), out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        gu = torch.mm(g2, u.to(g.dtype)).float()
        av = torch.mm(a2, v.to(a.dtype)).float()
    s = torch.bmm(gu.view(bsz, seq, -1).transpose(1, 2), av.view(bsz, seq, -1))
    return s, s.square().sum(dim=(1, 2))


def probe_proj(bsz, seq, ranks):
    from dpkern.kernels.subspace_proj import SubspaceProjConfig, subspace_proj_config
    from dpkern.subspace import orthonormalize, subspace_project
    rows = []
    for name, (d, p) in SHAPES.items():
        a = torch.randn(bsz, seq, d, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(bsz, seq, p, device="cuda", dtype=torch.bfloat16)
        nbytes = (a.numel() + g.numel()) * 2
        for r in ranks:
            u = orthonormalize(torch.randn(p, r, device="cuda"))
            v = orthonormalize(torch.randn(d, r, device="cuda"))
            s_ref, _ = subspace_project(a.double(), g.double(), u.double(), v.double())
            heur = subspace_proj_config(bsz, seq, a.device, rank=r)
            cands = {"heuristic": heur}
            for bt in (16, 32, 64):
                for bk in (64, 128):
                    split = max(1, seq // bt)
                    cands[f"bt{bt}_bk{bk}_s{split}_w4"] = SubspaceProjConfig(bt, bk, split, 4,
                                                                              "tf32")
            for cname, cfg in cands.items():
                try:
                    ms = _time(lambda: subspace_project(a, g, u, v, config=cfg))
                    s, _ = subspace_project(a, g, u, v, config=cfg)
                    err = float((s.double() - s_ref).norm() / s_ref.norm())
                except Exception as e:  # a config the compiler refuses
                    rows.append(dict(shape=name, r=r, impl=cname, error=repr(e)[:200]))
                    continue
                rows.append(dict(shape=name, r=r, impl=cname, ms=ms, gbps=nbytes / ms / 1e6,
                                 rel_err=err))
            ms = _time(lambda: _cublas_project(a, g, u, v))
            s, _ = _cublas_project(a, g, u, v)
            rows.append(dict(shape=name, r=r, impl="cublas", ms=ms, gbps=nbytes / ms / 1e6,
                             rel_err=float((s.double() - s_ref).norm() / s_ref.norm())))
    return rows


def probe_steps(bsz, seq, steps):
    import gc

    from bench.bench_subspace import llama_dp_step
    out = {}
    for mode in ("full", "subspace-16", "subspace-64"):
        gc.collect()
        torch.cuda.empty_cache()
        model, opt, _, step = llama_dp_step(mode, bsz, seq)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        wall, host = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            wall.append(time.perf_counter() - t0)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        kern = sorted((e for e in ka if e.device_time_total > 0 and e.device_type.name == "CUDA"),
                      key=lambda e: -e.self_device_time_total)
        out[mode] = dict(
            wall_ms=1e3 * statistics.median(wall), host_ms=1e3 * statistics.median(host),
            gpu_kernel_ms=sum(e.self_device_time_total for e in kern) / 1e3,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            top=[dict(name=e.key[:90], ms=e.self_device_time_total / 1e3, calls=e.count)
                 for e in kern[:25]],
            top_cpu=[dict(name=e.key[:90], self_cpu_ms=e.self_cpu_time_total / 1e3, calls=e.count)
                     for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:25]])
        del model, opt, step  # the closure holds the model: without it the next mode's peak
        gc.collect()          # would include this model and its AdamW states
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--parts", default="proj,steps")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = dict(device=torch.cuda.get_device_name(), batch=args.batch, seq=args.seq)
    parts = args.parts.split(",")
    if "proj" in parts:
        res["proj"] = probe_proj(args.batch, args.seq, (16, 64))
        (out / "probe.json").write_text(json.dumps(res, indent=1))
    if "steps" in parts:
        res["steps"] = probe_steps(args.batch, args.seq, args.steps)
    (out / "probe.json").write_text(json.dumps(res, indent=1))
    lines = [f"{res['device']}  B={args.batch} T={args.seq}"]
    for row in res.get("proj", []):
        lines.append(json.dumps(row))
    for mode, st in res.get("steps", {}).items():
        lines.append(f"\n{mode}: wall {st['wall_ms']:.1f} ms, host {st['host_ms']:.1f} ms, "
                     f"kernels {st['gpu_kernel_ms']:.1f} ms, peak {st['peak_gib']:.1f} GiB")
        lines += [f"  {t['ms']:8.2f} ms {t['calls']:5d}x {t['name']}" for t in st["top"]]
        lines.append("  -- self CPU --")
        lines += [f"  {t['self_cpu_ms']:8.2f} ms {t['calls']:5d}x {t['name']}" for t in st["top_cpu"]]
    (out / "probe.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
