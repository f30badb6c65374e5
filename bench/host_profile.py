"""Where does the host (Python) time of a training step go? bench/gpu_busy.py shows that a dpkern
step on the 1B model keeps the GPU busy only part of the time; this script runs cProfile over a
few steps of bench/e2e_step.py's model and prints the functions that cost the most host time,
plus the host time of each phase (forward, backward, optimizer step) without the profiler.

    python -m bench.host_profile --case 16x256 --precision bf16 --out host_profile.txt
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics

import torch

from bench.e2e_step import Runner, _parse_cases, case_inputs, free, llama_config
from bench.host_phases import clipper_clock, one_step, profile_clipper


def phases(runner, ids, pos, amp, steps) -> dict:
    """Median host ms of forward, backward and optimizer step (no synchronisation inside a step,
    so each number is the time to issue that phase's work; host_phases.one_step) and of the
    whole synchronised step."""
    rows = [one_step(runner, None, ids, pos, amp) for _ in range(steps)]
    for r in rows:
        r["total"] = r["forward"] + r["backward"] + r["step"] + r["tail"]
    return {k: statistics.median(r[k] for r in rows) for k in ("forward", "backward", "step",
                                                                "total")}


def sync_sites(runner, ids, pos, amp, steps=2) -> list:
    """Host-GPU synchronisations in `steps` steps (torch's sync debug mode, "warn"), each with the
    stack that issued it (innermost frames of dpkern, bench, torch.optim or transformers)."""
    import collections
    import traceback
    import warnings
    sites = collections.Counter()
    old = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return old(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1]
                  if any(k in f.filename for k in ("dpkern", "bench", "optim", "transformers"))]
        sites[" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}({f.name})"
                          for f in reversed(frames[-6:]))] += 1
    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                runner.step(ids, pos, amp)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites.most_common()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--case", default="16x256")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--modes", default="nonprivate,dpkern")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--out", default="host_profile.txt")
    ap.add_argument("--clipper-only", action="store_true",
                    help="profile only dpkern's end-of-backward clipper (the other modes: whole steps)")
    ap.add_argument("--sync-check", action="store_true",
                    help="also list the host-GPU synchronisations of two steps, with their stacks")
    args = ap.parse_args(argv)
    args.backend, args.sigma, args.clip = "triton", 1.0, 1.0
    cfg = llama_config(False)
    (bsz, seq), = _parse_cases(args.case)
    ids, pos, amp = case_inputs(cfg, bsz, seq, args.precision)
    report = io.StringIO()
    for mode in args.modes.split(","):
        runner = Runner(cfg, "cuda", mode, args, expected_bsz=bsz)
        for _ in range(3):
            runner.step(ids, pos, amp)
        ph = phases(runner, ids, pos, amp, args.steps)
        line = (f"{mode} {args.precision} {bsz}x{seq}: host ms forward {ph['forward']:.1f}, "
                f"backward {ph['backward']:.1f}, step {ph['step']:.1f}; wall {ph['total']:.1f}")
        print(line, flush=True)
        report.write(line + "\n")
        if args.sync_check:
            sites = sync_sites(runner, ids, pos, amp)
            msg = (f"{mode}: {sum(n for _, n in sites)} host-GPU synchronisations in two steps\n"
                   + "".join(f"  {n} x {site}\n" for site, n in sites))
            print(msg, flush=True)
            report.write(msg)
        prof = cProfile.Profile()
        clock = clipper_clock(runner.model) if args.clipper_only else None
        if clock is not None:  # the profiler on inside the clipper only
            profile_clipper(clock, prof)
        torch.cuda.synchronize()
        if clock is None:
            prof.enable()
        for _ in range(args.steps):
            runner.step(ids, pos, amp)
        torch.cuda.synchronize()
        prof.disable()
        prof.dump_stats(f"{args.out}.{mode}.pstats")
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
            what = "the clipper" if clock is not None else "steps"
            report.write(f"\n==== {mode}: top {args.top} by {key}, {what} of {args.steps} "
                         "steps ====\n")
            report.write(s.getvalue())
        runner.close()
        del runner
        free("cuda")
    with open(args.out, "w") as f:
        f.write(report.getvalue())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
