"""End-to-end training step: non-private vs dpkern, same model, batch and precision, one process.

Model: Llama-style, 953M parameters (hidden 2048, MLP 5632, 16 layers, 32 heads, vocab 32000,
untied lm_head, eager attention), random init from transformers' LlamaConfig; AdamW.
For each (B, T) case and precision ("fp32-tf32": fp32 weights with TF32 matmuls; "bf16": bf16
autocast over fp32 weights) it times `--steps` steps after `--warmup` (CUDA events, median) and
records the peak memory of the timed steps, then writes one JSON (GPU name, versions, commit, date,
every run, and dpkern / non-private ratios).

    python bench/e2e_step.py --out bench/results/e2e_step.json            # GPU, the issue's table
    python bench/e2e_step.py --tiny --device cpu --steps 2 --warmup 1     # smoke test, no GPU
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import statistics
import subprocess
import time

import torch

CASES = [(8, 512), (16, 256), (1, 4096)]
PRECISIONS = ["fp32-tf32", "bf16"]
MODES = ["nonprivate", "dpkern"]


def llama_config(tiny: bool):
    from transformers import LlamaConfig
    if tiny:
        kw = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
    else:
        kw = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=32)
    cfg = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def set_tf32(enabled: bool) -> None:
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):
        mm.fp32_precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        mm.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def build(cfg, device, mode, bsz, backend, sigma, clip):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if mode == "dpkern":
        import dpkern
        engine = dpkern.PrivacyEngine(accountant="rdp", backend=backend)
        # fixed-size batches for timing: no data loader, the public sampling rate given directly
        model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=None,
                                            noise_multiplier=sigma, max_grad_norm=clip,
                                            expected_batch_size=bsz, sample_rate=1e-3, seed=0)
    return model, opt


def run_one(cfg, device, mode, precision, bsz, seq, args) -> dict:
    set_tf32(precision == "fp32-tf32")
    model, opt = build(cfg, device, mode, bsz, args.backend, args.sigma, args.clip)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (bsz, seq), generator=gen).to(device)
    amp = (torch.autocast(device_type=device, dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())
    cuda = device == "cuda"

    def step():
        with amp:
            # equal-length sequences, no padding: the token mean is the mean of per-sample losses
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t0) * 1e3)
    res = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
           "loss": float(loss.detach()), "n_params": sum(p.numel() for p in model.parameters())}
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default=",".join(f"{b}x{t}" for b, t in CASES),
                    help="comma-separated BxT list")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--backend", default="triton", help="dpkern backend for the per-sample ops")
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model (smoke test)")
    ap.add_argument("--out", default="e2e_step.json")
    args = ap.parse_args(argv)

    cfg = llama_config(args.tiny)
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",") if c]
    report = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
              "torch": torch.__version__, "commit": _git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "model": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size",
                                                     "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads")},
              "steps": args.steps, "warmup": args.warmup, "backend": args.backend, "runs": []}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        pass
    for bsz, seq in cases:
        for precision in args.precisions.split(","):
            by_mode = {}
            for mode in args.modes.split(","):
                entry = {"B": bsz, "T": seq, "precision": precision, "mode": mode}
                try:
                    entry.update(run_one(cfg, args.device, mode, precision, bsz, seq, args))
                except torch.cuda.OutOfMemoryError:
                    entry["error"] = "out of memory"
                    gc.collect()
                    torch.cuda.empty_cache()
                by_mode[mode] = entry
                report["runs"].append(entry)
                print(json.dumps(entry), flush=True)
            base, dp = by_mode.get("nonprivate"), by_mode.get("dpkern")
            if base and dp and "median_ms" in base and "median_ms" in dp:
                ratio = {"B": bsz, "T": seq, "precision": precision, "mode": "ratio",
                         "time_ratio": dp["median_ms"] / base["median_ms"]}
                if "peak_mem_gib" in base:
                    ratio["mem_ratio"] = dp["peak_mem_gib"] / base["peak_mem_gib"]
                report["runs"].append(ratio)
                print(json.dumps(ratio), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
