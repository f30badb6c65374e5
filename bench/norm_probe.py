"""Ghost against instantiated per-sample norms as the engine launches them, on the GPU.

    python bench/norm_probe.py --out /tmp/norm_probe [--cases 8x512,16x256] [--sweep]

The engine launches the ghost norm once per layout over all layers of that layout (a pointer
table: 16 q/k/v groups in one launch) and the instantiated norm once per layer. For each layer
kind of the 1B Llama (q/k/v, o, gate/up, down; 16 layers each), batch case and dtype this times
both forms over the 16 layers: GPU time of their kernels (torch.profiler, partial sums included)
and the FLOP-model choice (`choose_method`). --sweep also times every ghost config of
`ghost_norm_search_space()`. Writes norm_probe.json and norm_probe.txt under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.subspace_probe import event_ms  # noqa: E402

KINDS = {"qkv": (2048, (2048, 2048, 2048)), "o": (2048, (2048,)), "gate_up": (2048, (5632, 5632)),
         "down": (5632, (2048,))}  # (d, output widths sharing the input)


def gpu_ms(fn, reps=10) -> float:
    """Mean GPU kernel time of fn() over reps calls (profiler device time)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages()
                if e.device_type.name == "CUDA")
    return total / 1e3 / reps


def probe(cases, dtypes, layers, sweep, kinds=tuple(KINDS), sweep_bt=None):
    from dpkern.kernels.ghost_norm import ghost_norm_grouped_fwd, ghost_norm_search_space
    from dpkern.kernels.instantiate_norm import instantiate_norm_fwd
    from dpkern.ops.linear_norm import choose_method, linear_norm_flops
    rows = []
    for bsz, seq in cases:
        for dtype in dtypes:
            mode = "tf32r" if dtype == torch.float32 else None
            for kind in kinds:
                d, ps = KINDS[kind]
                as_ = [torch.randn(bsz, seq, d, device="cuda").to(dtype) for _ in range(layers)]
                gss = [[torch.randn(bsz, seq, p, device="cuda").to(dtype) for p in ps]
                       for _ in range(layers)]
                out = torch.empty(layers, len(ps), bsz, device="cuda")
                inst_out = [torch.empty(bsz, device="cuda") for _ in range(layers * len(ps))]

                def ghost(cfg=None):
                    ghost_norm_grouped_fwd(as_, gss, out, config=cfg, fp32_mode=mode)

                def inst():
                    k = 0
                    for a, gs in zip(as_, gss):
                        for g in gs:
                            instantiate_norm_fwd(a, g, inst_out[k], fp32_mode=mode)
                            k += 1

                ghost()
                ref = out.clone()
                inst()
                got = torch.stack(inst_out).view(layers, len(ps), bsz)
                rel = float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())
                row = dict(batch=bsz, seq=seq, dtype=str(dtype).split(".")[-1], kind=kind, d=d,
                           ps=list(ps), layers=layers, choice=choose_method(seq, d, list(ps)),
                           ghost_ms=gpu_ms(ghost), inst_ms=gpu_ms(inst), inst_vs_ghost_rel=rel,
                           ghost_flops=layers * bsz * (linear_norm_flops(seq, d, 0, "ghost") + sum(
                               linear_norm_flops(seq, 0, p, "ghost") for p in ps)),
                           inst_flops=layers * bsz * sum(linear_norm_flops(seq, d, p, "instantiate")
                                                          for p in ps))
                row["ghost_tflops"] = row["ghost_flops"] / row["ghost_ms"] / 1e9
                row["inst_tflops"] = row["inst_flops"] / row["inst_ms"] / 1e9
                if sweep:
                    cfgs = []
                    for cfg in ghost_norm_search_space():
                        if sweep_bt and cfg.BLOCK_T not in sweep_bt:
                            continue
                        try:
                            cfgs.append(dict(cfg=[cfg.BLOCK_T, cfg.BLOCK_K, cfg.num_warps,
                                                  cfg.num_stages], ms=event_ms(lambda: ghost(cfg), 5)))
                        except Exception as e:  # a config the compiler refuses (shared memory)
                            cfgs.append(dict(cfg=[cfg.BLOCK_T, cfg.BLOCK_K, cfg.num_warps,
                                                  cfg.num_stages], error=repr(e)[:120]))
                    row["ghost_sweep"] = sorted(cfgs, key=lambda c: c.get("ms", 1e9))[:6]
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "ghost_sweep"}),
                      flush=True)
                del as_, gss
                torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="8x512,16x256,32x128,2x2048")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--sweep-bt", default="", help="sweep only these BLOCK_T (e.g. 128)")
    args = ap.parse_args()
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    dtypes = [{"bf16": torch.bfloat16, "fp32": torch.float32}[x] for x in args.dtypes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = probe(cases, dtypes, args.layers, args.sweep, tuple(args.kinds.split(",")),
                 tuple(int(x) for x in args.sweep_bt.split(",") if x))
    res = dict(device=torch.cuda.get_device_name(), rows=rows)
    (out / "norm_probe.json").write_text(json.dumps(res, indent=1))
    lines = [res["device"], f"{'case':>8} {'dtype':>5} {'kind':>7} {'choice':>11} "
             f"{'ghost ms':>9} {'inst ms':>8} {'ghost TF':>8} {'inst TF':>8}  best ghost configs"]
    for r in rows:
        best = "; ".join(f"{c['cfg']} {c['ms']:.3f}" for c in r.get("ghost_sweep", [])[:3]
                         if "ms" in c)
        lines.append(f"{r['batch']:>3}x{r['seq']:<4} {r['dtype']:>5} {r['kind']:>7} "
                     f"{r['choice']:>11} {r['ghost_ms']:9.3f} {r['inst_ms']:8.3f} "
                     f"{r['ghost_tflops']:8.1f} {r['inst_tflops']:8.1f}  {best}")
    (out / "norm_probe.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
