"""DP step vs non-private step of a Llama on CPU: time per step and peak memory (a first baseline).

    .venv/bin/python bench/bench_engine_cpu.py                 # ~100M-parameter Llama, both modes
    .venv/bin/python bench/bench_engine_cpu.py --layers 2 --hidden 64 --vocab 512   # quick

Each mode runs in its own process (peak RSS is per process): the non-private step is
forward + backward + AdamW; the DP step is the same through PrivacyEngine (flat clipping, σ = 1,
book-keeping, noise). Under pytest only a tiny configuration runs, as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 64), max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def run_mode(args) -> dict:
    from dpkern import PrivacyEngine
    from dpkern.losses import per_sample_losses
    torch.set_num_threads(args.threads)
    model = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if args.mode == "dp":
        model, opt, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=opt, data_loader=None, noise_multiplier=1.0,
            max_grad_norm=1.0, expected_batch_size=args.batch, sample_rate=0.01)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        per_sample_losses(model, batch).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    times = times[args.warmup:]
    return {"mode": args.mode, "params_M": n_params / 1e6, "batch": args.batch, "seq": args.seq,
            "threads": args.threads, "step_s_median": statistics.median(times),
            "step_s_min": min(times), "step_s_max": max(times),
            "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["dp", "plain", "both"], default="both")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    return ap.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.mode != "both":
        print(json.dumps(run_mode(args)))
        return
    rows = []
    for mode in ("plain", "dp"):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "mode"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    for r in rows:
        print(f"{r['mode']:>5}: {r['params_M']:.1f}M params, B={r['batch']} T={r['seq']}, "
              f"{r['threads']} threads: step {r['step_s_median']:.2f} s (min {r['step_s_min']:.2f},"
              f" max {r['step_s_max']:.2f}), peak RSS {r['peak_rss_GiB']:.2f} GiB")
    print(f"DP / plain: time x{rows[1]['step_s_median'] / rows[0]['step_s_median']:.2f}, "
          f"peak RSS x{rows[1]['peak_rss_GiB'] / rows[0]['peak_rss_GiB']:.2f}")


def test_engine_step_smoke():
    """Tiny configuration: both modes run and the DP step is finite (no timing claims)."""
    args = parse(["--layers", "2", "--hidden", "64", "--vocab", "256", "--seq", "16",
                  "--steps", "1", "--warmup", "0", "--threads", "1"])
    for mode in ("plain", "dp"):
        args.mode = mode
        r = run_mode(args)
        assert r["step_s_median"] > 0


if __name__ == "__main__":
    main()
