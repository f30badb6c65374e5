"""Book-keeping kernel configs and the fp32 K-major copy at the 1B model's Linear shapes (GPU).

    python bench/bk_probe.py [--out FILE] [--cases 16x256,8x512] [--quick]

For each case (B×T) and Linear shape (d → p of the 953M Llama: 2048→2048, 2048→5632, 5632→2048)
and dtype (bf16; fp32 as the engine runs it: TF32-rounded K-major copies, then the kernel), times
every config of `configs()` (the default heuristic first) and torch.matmul of the same GEMM
(bf16, or TF32 for fp32), and the K-major copy kernel with a few tile shapes (GB/s counting bytes
read and written; each checked bit for bit against kmajor_tf32_copy). `bit_identical` says whether
a config's sum equals the default config's (another token step sums in another order: equal up to
fp32 rounding, not bit for bit). Prints a table; --out writes JSON.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.testing

from dpkern.kernels import bookkeeping as kb

SHAPES = ((2048, 2048), (2048, 5632), (5632, 2048))


def configs(quick: bool) -> list:
    """Default first, then larger tiles / deeper pipelines / longer token steps."""
    c = kb.BookkeepingConfig
    out = [None, c(128, 256, 64, 8, 8, 3), c(256, 128, 64, 8, 8, 3), c(128, 128, 128, 8, 8, 3),
           c(128, 128, 64, 8, 8, 4), c(128, 128, 32, 8, 4, 4)]
    if not quick:
        out += [c(128, 256, 32, 8, 8, 4), c(128, 128, 64, 8, 4, 3), c(128, 256, 64, 8, 8, 4),
                c(64, 256, 64, 8, 4, 4), c(128, 128, 64, 4, 8, 3), c(128, 128, 64, 16, 8, 3)]
    return out


def copy_variants():
    return [(64, 64, 4), (32, 128, 4), (128, 32, 4), (64, 128, 8), (128, 64, 8), (32, 32, 2)]


def time_copy(x, block_t, block_n, warps):
    bsz, seq, n = x.shape
    y = torch.empty(bsz, n, seq, device=x.device)
    grid = (triton.cdiv(seq, block_t), triton.cdiv(n, block_n), bsz)

    def run():
        kb._kmajor_tf32_kernel[grid](x, y, seq, n, x.stride(0), x.stride(1), x.stride(2),
                                     BLOCK_T=block_t, BLOCK_N=block_n, num_warps=warps)
    run()
    ref = kb.kmajor_tf32_copy(x)
    assert torch.equal(y.transpose(1, 2).view(torch.int32), ref.view(torch.int32))
    ms = triton.testing.do_bench(run, warmup=10, rep=40)
    return ms, 2 * x.numel() * 4 / ms / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="16x256,8x512")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows, copies = [], []
    for case in args.cases.split(","):
        bsz, seq = map(int, case.split("x"))
        for d, p in SHAPES:
            for dt in args.dtypes.split(","):
                dtype = torch.float32 if dt == "fp32" else torch.bfloat16
                a = torch.randn(bsz, seq, d, device="cuda").to(dtype)
                g = torch.randn(bsz, seq, p, device="cuda").to(dtype)
                s = torch.rand(bsz, device="cuda")
                pre = dtype == torch.float32
                a_k, g_k = (kb.kmajor_tf32_copy(a), kb.kmajor_tf32_copy(g)) if pre else (a, g)
                w = torch.empty(p, d, device="cuda")
                flops = 2 * bsz * seq * d * p
                a2, g2 = a.reshape(-1, d), g.reshape(-1, p)
                torch.backends.cuda.matmul.allow_tf32 = True
                mm = triton.testing.do_bench(lambda: torch.matmul(g2.t(), a2), warmup=10, rep=40)
                torch.backends.cuda.matmul.allow_tf32 = False
                ref = None
                for cfg in configs(args.quick):
                    run = lambda: kb.bookkeeping_fwd(a_k, g_k, s, w, False, cfg,  # noqa: E731
                                                     fp32_mode="tf32r", pre_rounded=pre)
                    try:
                        run()
                        if ref is None:
                            ref = w.clone()
                        same = bool(torch.equal(w, ref))
                        ms = triton.testing.do_bench(run, warmup=10, rep=40)
                    except Exception as e:  # out of shared memory / registers
                        rows.append(dict(case=case, d=d, p=p, dtype=dt, config=str(cfg),
                                         error=str(e)[:120]))
                        continue
                    rows.append(dict(case=case, d=d, p=p, dtype=dt, config=str(cfg), ms=ms,
                                     tflops=flops / ms / 1e9, matmul_ms=mm,
                                     of_matmul=mm / ms, bit_identical=same))
                    print(f"{case} {d}->{p} {dt} {cfg}: {ms:.4f} ms "
                          f"{flops / ms / 1e9:.0f} TF/s ({mm / ms:.0%} of matmul {mm:.4f}) "
                          f"same={same}", flush=True)
                if pre and d == 2048:  # the copy: once per width
                    for n, x in ((d, a), (p, g)):
                        for bt, bn, wp in copy_variants():
                            ms, gbs = time_copy(x, bt, bn, wp)
                            copies.append(dict(case=case, n=n, block_t=bt, block_n=bn,
                                               warps=wp, ms=ms, gb_s=gbs))
                            print(f"copy {case} n={n} {bt}x{bn} w{wp}: {ms:.4f} ms "
                                  f"{gbs:.0f} GB/s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, copies=copies), f,
                      indent=1)


if __name__ == "__main__":
    main()
