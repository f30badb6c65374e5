"""Where a dpkern DP step's time goes vs the non-private step: torch.profiler kernel table.

    python bench/e2e_profile.py --out DIR [--cases 8x512,1x2048] [--precision bf16] [--tiny]

Same model as bench/e2e_step.py (953M Llama-style; --tiny for a CPU smoke test). For each case and
mode (nonprivate, dpkern) it profiles a few steps after warm-up and writes DIR/profile_<case>_<mode>.txt
(top kernels/ops by device time) and a JSON with the totals; the printed diff lists the ops whose
time grew most from the non-private step to the DP step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_step  # noqa: E402


def _table(prof, device: str) -> dict:
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    rows = {}
    for ev in prof.key_averages():
        t = getattr(ev, key, 0.0) or 0.0
        if device == "cuda" and ev.device_type != torch.autograd.DeviceType.CUDA and t == 0:
            continue
        rows[ev.key] = rows.get(ev.key, 0.0) + t / 1e3  # ms
    return rows


def profile_case(mode, cfg, device, precision, bsz, seq, args, out_dir) -> dict:
    runner = e2e_step.Runner(cfg, device, mode, args, bsz)
    e2e_step.set_tf32(precision == "fp32-tf32")
    ids = torch.randint(0, cfg.vocab_size, (bsz, seq)).to(device)
    pos = torch.arange(seq, device=device).expand(bsz, seq).contiguous()
    amp = (torch.autocast(device_type=device, dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())
    for _ in range(2):
        runner.step(ids, pos, amp)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        torch.cuda.synchronize()
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            runner.step(ids, pos, amp)
        if device == "cuda":
            torch.cuda.synchronize()
    rows = {k: v / args.steps for k, v in _table(prof, device).items()}
    name = f"{bsz}x{seq}_{precision}_{mode}"
    top = sorted(rows.items(), key=lambda kv: -kv[1])
    with open(os.path.join(out_dir, f"profile_{name}.txt"), "w") as f:
        for k, v in top[:60]:
            f.write(f"{v:10.3f} ms  {k}\n")
    runner.close()
    e2e_step.free(device)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="8x512,1x2048")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--out", default="e2e_profile")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = e2e_step.llama_config(args.tiny)
    report = {}
    for case in args.cases.split(","):
        bsz, seq = (int(x) for x in case.split("x"))
        base = profile_case("nonprivate", cfg, args.device, args.precision, bsz, seq, args, args.out)
        dp = profile_case("dpkern", cfg, args.device, args.precision, bsz, seq, args, args.out)
        diff = sorted(((dp.get(k, 0.0) - base.get(k, 0.0), k) for k in set(dp) | set(base)),
                      reverse=True)
        report[case] = {"nonprivate_total_ms": sum(base.values()), "dpkern_total_ms": sum(dp.values()),
                        "grew_most": [(k, round(d, 3)) for d, k in diff[:25]]}
        print(f"== {case} {args.precision}: summed op time (overlapping levels) non-private "
              f"{sum(base.values()):.1f} ms, dpkern {sum(dp.values()):.1f} ms; grew most:")
        for d, k in diff[:25]:
            print(f"  {d:+9.3f} ms  {k}")
    with open(os.path.join(args.out, "e2e_profile.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
