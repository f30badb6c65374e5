"""Data-parallel scaling of DP training (dpkern) and non-private training, and the noise check.

    python bench/dist_scaling.py --out $OUT                 # GPUs: nccl, ~1B and ~3B Llama
    python bench/dist_scaling.py --cpu --out /tmp/dist      # CPU smoke test: gloo, tiny Llama

Stages, noise first (each in fresh processes through dpkern.distributed.launch.spawn, NVLink
multicast off; a failing stage is recorded and the next one runs; results are written after
every stage):
  scaling  for each model and world size in {1, W}: tokens/s of non-private training (DDP with its
           own gradient all-reduce) and of DP training (PrivacyEngine on 1 rank,
           DistributedPrivacyEngine over DDP on W), random init (LlamaConfig, no download),
           per-rank batch fixed (weak scaling); efficiency = tps(W) / (W * tps(1)).
           --modes adds dp_fsdp (DistributedPrivacyEngine over FSDP2, every decoder layer a
           unit: each clipped sum reduce-scattered as it is written) and dp_fsdp_at_step (the
           same with reduce_at_step: full-size sums kept until step()); peak memory per rank.
  noise    one noise-only step (empty batch, SGD lr=1) single-process vs W ranks (DDP and FSDP2),
           same seed: z = -B * (theta1 - theta0) / (sigma * C); variance of z on every coordinate
           of the model (should be 1, equal to the single process's) and the largest difference
           of the z's themselves.
Writes results.json, scaling.csv, summary.txt under --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dpkern.distributed import launch  # noqa: E402

MODELS = {  # Llama-style, vocab cut to 32000 (no tokenizer needed)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, vocab_size=32000),
    "noise": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, vocab_size=8192),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
}
SIGMA, CLIP = 1.0, 1.0


def _llama(name: str, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    cfg = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False,
                      attn_implementation="sdpa", **MODELS[name])
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg)


def _device(rank: int, kind: str) -> torch.device:
    return torch.device("cuda", rank) if kind == "cuda" else torch.device("cpu")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def scaling_worker(rank: int, world: int, cfg: dict) -> dict:
    """tokens/s of each mode in cfg["modes"] for cfg["model"] on this process group."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dpkern import PrivacyEngine
    from dpkern.distributed import DistributedPrivacyEngine
    from dpkern.losses import causal_lm_per_sample_loss
    dev = _device(rank, cfg["device"])
    bsz, seq = cfg["batch"], cfg["seq"]
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, MODELS[cfg["model"]]["vocab_size"], (bsz, seq), generator=g).to(dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    out = {}
    for mode in cfg["modes"]:
        model = _llama(cfg["model"], dev)
        n_params = sum(p.numel() for p in model.parameters())
        private = mode.startswith("dp")
        if mode.startswith("dp_fsdp"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(dev.type, (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # after fully_shard: DTensors
        if mode.startswith("dp_fsdp"):
            model, opt, _ = DistributedPrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=opt, data_loader=None, noise_multiplier=SIGMA,
                max_grad_norm=CLIP, expected_batch_size=bsz * world, sample_rate=0.01,
                loss_reduction="sum")
            opt.reduce_at_step = mode == "dp_fsdp_at_step"
            opt.inflight_bytes = cfg.get("inflight_bytes", 0)
        elif private and world == 1:
            model, opt, _ = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=opt, data_loader=None, noise_multiplier=SIGMA,
                max_grad_norm=CLIP, expected_batch_size=bsz, sample_rate=0.01,
                loss_reduction="sum")
        elif private:
            ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
            model, opt, _ = DistributedPrivacyEngine(accountant="rdp").make_private(
                module=ddp, optimizer=opt, data_loader=None, noise_multiplier=SIGMA,
                max_grad_norm=CLIP, expected_batch_size=bsz * world, sample_rate=0.01,
                loss_reduction="sum")
        elif world > 1:
            model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if private:
            # bf16 output gradients: the engine needs the sum of per-sample losses; the update
            # is still divided by B_expected (the "mean" update without its B_realized rounding)
            opt.average_sum = True

        def step():
            with amp:
                logits = model(input_ids=ids).logits
            per_sample = causal_lm_per_sample_loss(logits.float(), ids)
            loss = per_sample.sum() if private else per_sample.mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(cfg["warmup"]):
            step()
        _sync(dev)
        t0 = time.perf_counter()
        times = []
        for _ in range(cfg["steps"]):
            s = time.perf_counter()
            step()
            _sync(dev)
            times.append(time.perf_counter() - s)
        total = time.perf_counter() - t0
        times.sort()
        out[mode] = {"params": n_params, "step_s_median": times[len(times) // 2],
                     "step_s_min": times[0], "step_s_max": times[-1],
                     "tokens_per_s": world * bsz * seq * cfg["steps"] / total,
                     "peak_mem_gib": (torch.cuda.max_memory_allocated(dev) / 2**30
                                      if dev.type == "cuda" else None)}
        del model, opt, step
        gc.collect()  # DDP / engine objects hold cycles: free the weights before the next mode
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def noise_worker(rank: int, world: int, cfg: dict) -> dict:
    """One noise-only step of each parallel mode; rank 0 returns z statistics and a z sample."""
    from dpkern import PrivacyEngine
    from dpkern.distributed import DistributedPrivacyEngine
    dev = _device(rank, cfg["device"])
    bexp = 8
    out = {}
    for mode in (["single"] if world == 1 else ["ddp", "fsdp"]):
        model = _llama(cfg["model"], dev)
        before = [p.detach().float().cpu().clone() for p in model.parameters()]
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        elif mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            # the mesh on the model's device: FSDP2's default picks CUDA whenever a GPU exists,
            # which breaks the --cpu mode on a GPU host
            mesh = init_device_mesh(dev.type, (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        eng = PrivacyEngine(accountant="rdp") if mode == "single" else \
            DistributedPrivacyEngine(accountant="rdp")
        model, opt, _ = eng.make_private(module=model, optimizer=opt, data_loader=None,
                                         noise_multiplier=SIGMA, max_grad_norm=CLIP,
                                         expected_batch_size=bexp, sample_rate=0.01, seed=11,
                                         loss_reduction="sum")
        opt.average_sum = True  # the noise-only update is then -lr * sigma * C * z / B
        opt.signal_empty_batch()
        opt.step()
        zs = []
        for p, p0 in zip(model.parameters(), before):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            zs.append(((p0 - full.detach().float().cpu()) * (bexp / (SIGMA * CLIP))).reshape(-1))
        z = torch.cat(zs).double()
        out[mode] = {"n": z.numel(), "mean": z.mean().item(), "var": z.var().item(),
                     "sample": z[: cfg["sample"]].float().clone()}
        del model, opt, zs, z
    return out if rank == 0 else {}


def run(args) -> dict:
    kind = "cpu" if args.cpu else "cuda"
    backend = "gloo" if args.cpu else "nccl"
    world = args.world
    res = {"config": vars(args), "backend": backend, "stages": {}, "errors": {},
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not args.cpu:
        res["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    res["torch"] = torch.__version__
    os.makedirs(args.out, exist_ok=True)
    # The noise check first: it is cheap and a cut-short run still has it.
    ncfg = dict(device=kind, model="tiny" if args.cpu else "noise", sample=1 << 20)
    for w in (1, world) if not args.no_noise else ():
        _stage(res, f"noise/world{w}", lambda: launch.spawn(
            noise_worker, w, backend=backend, args=(ncfg,), timeout_s=args.stage_timeout)[0], args)
    base = dict(device=kind, batch=args.batch, seq=args.seq, warmup=args.warmup,
                steps=args.steps, modes=args.modes.split(","), inflight_bytes=args.inflight_bytes)
    for model in args.models.split(","):
        for w in (1, world):
            name = f"scaling/{model}/world{w}"
            _stage(res, name, lambda: launch.spawn(scaling_worker, w, backend=backend,
                                                   args=(dict(base, model=model),),
                                                   timeout_s=args.stage_timeout)[0], args)
    return res


def _stage(res, name, fn, args):
    t0 = time.perf_counter()
    print(f"[dist_scaling] {name} ...", flush=True)
    try:
        res["stages"][name] = fn()
        print(f"[dist_scaling] {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    except Exception:
        res["errors"][name] = traceback.format_exc()[-4000:]
        print(f"[dist_scaling] {name}: FAILED after {time.perf_counter() - t0:.0f} s\n"
              + res["errors"][name], flush=True)
    write(res, args)


def summarize(res, world) -> tuple[list, list]:
    rows, lines = [], []
    st = res["stages"]
    for model in res["config"]["models"].split(","):
        one, many = st.get(f"scaling/{model}/world1"), st.get(f"scaling/{model}/world{world}")
        for mode in res["config"].get("modes", "nonprivate,dp").split(","):
            a = (one or {}).get(mode)
            b = (many or {}).get(mode)
            eff = b["tokens_per_s"] / (world * a["tokens_per_s"]) if a and b else None
            rows.append({"model": model, "mode": mode, "params": (a or b or {}).get("params"),
                         "tps_1": a and a["tokens_per_s"], f"tps_{world}": b and b["tokens_per_s"],
                         "speedup": eff and eff * world, "efficiency": eff,
                         "mem_gib_1": a and a["peak_mem_gib"],
                         f"mem_gib_{world}": b and b["peak_mem_gib"]})
            lines.append(f"{model:6s} {mode:10s} tokens/s 1: {_f(a and a['tokens_per_s'])}  "
                         f"{world}: {_f(b and b['tokens_per_s'])}  efficiency {_f(eff, 3)}")
    s1, sw = st.get("noise/world1", {}).get("single"), st.get(f"noise/world{world}", {})
    for mode in ("ddp", "fsdp"):
        d = sw.get(mode)
        if s1 and d:
            ratio = d["var"] / s1["var"]
            diff = (d["sample"] - s1["sample"]).abs().max().item()
            res.setdefault("noise_check", {})[mode] = {
                "var_single": s1["var"], f"var_world{world}": d["var"], "ratio": ratio,
                "within_1pct": abs(ratio - 1) <= 0.01, "n": d["n"],
                "max_abs_z_diff_sample": diff}
            lines.append(f"noise {mode}: var single {s1['var']:.5f}, {world} ranks {d['var']:.5f}"
                         f" (ratio {ratio:.5f}, n={d['n']}); max |z diff| on {s1['sample'].numel()}"
                         f" coords {diff:.2e}")
    for name in res["errors"]:
        lines.append(f"FAILED stage {name} (see results.json errors)")
    return rows, lines


def _f(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def write(res, args):
    rows, lines = summarize(res, args.world)
    clean = json.loads(json.dumps(res, default=lambda o: None))  # tensors (z samples) dropped
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(clean, f, indent=1)
    if rows:
        keys = list(rows[0])
        with open(os.path.join(args.out, "scaling.csv"), "w") as f:
            f.write(",".join(keys) + "\n")
            for r in rows:
                f.write(",".join("" if r[k] is None else str(r[k]) for k in keys) + "\n")
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="gloo + tiny Llama (CPU smoke test)")
    ap.add_argument("--out", default="bench/results/dist")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--models", default=None, help="comma list of 1b,3b,tiny")
    ap.add_argument("--batch", type=int, default=None, help="per-rank batch (sequences)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--stage-timeout", type=float, default=150.0)
    ap.add_argument("--modes", default="nonprivate,dp",
                    help="comma list of nonprivate,dp,dp_fsdp,dp_fsdp_at_step")
    ap.add_argument("--inflight-bytes", type=int, default=0,
                    help="dp_fsdp: ShardedDPOptimizer.inflight_bytes (reductions in flight)")
    ap.add_argument("--no-noise", action="store_true", help="skip the noise check")
    args = ap.parse_args(argv)
    args.models = args.models or ("tiny" if args.cpu else "1b,3b")
    args.batch = args.batch or (2 if args.cpu else 4)
    args.seq = args.seq or (16 if args.cpu else 512)
    args.steps = args.steps or (2 if args.cpu else 6)
    if not args.cpu:
        os.environ.pop("TRITON_INTERPRET", None)
    res = run(args)
    rows, lines = summarize(res, args.world)
    write(res, args)
    print("\n".join(lines))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
