"""Book-keeping kernel configs and the fp32 K-major copy at the 1B model's Linear shapes (GPU).

    python bench/bk_probe.py [--out FILE] [--cases 16x256,8x512] [--quick]

For each case (B×T) and Linear shape (d → p of the 953M Llama: 2048→2048, 2048→5632,
5632→2048) and dtype (bf16; fp32 as the engine runs it: TF32-rounded K-major copies, then the kernel), times
every config of `configs()` (the default heuristic first) and torch.matmul of the same GEMM
(bf16, or TF32 for fp32), and the K-major copy kernel with a few tile shapes (GB/s counting bytes
read and written; each checked bit for bit against kmajor_tf32_copy). `bit_identical` says whether
a config's sum equals the default config's (another token step sums in another order: equal up to
fp32 rounding, not bit for bit). --variants adds, in bf16, two diagnostic twins of the kernel:
the plain GEMM (no per-sample scale) and the loop-per-sample form. --boundary adds, in bf16, TMA
twins of the per-sample boundary: the next sample's scale loaded ahead, and tiles small enough
for two fp32 accumulators without spilling. --ws adds the plain GEMM warp-specialised by Triton.
Prints a table; --out: JSON.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
import triton.testing

from dpkern.kernels import bookkeeping as kb

SHAPES = ((2048, 2048), (2048, 5632), (5632, 2048))
GRAPH = False  # --graph: replay the launches from a CUDA graph


def _bench(fn) -> float:
    """ms of fn on the GPU. By default launch after launch (triton.testing.do_bench): where the
    host takes longer to issue a launch than the GPU to run it (the kernel's Python launch path
    at the 2048 x 2048 shapes), that measures the host. --graph replays a CUDA graph of the
    launches instead (do_bench_cudagraph), which leaves the GPU time."""
    if GRAPH:
        return triton.testing.do_bench_cudagraph(fn, rep=40)
    return triton.testing.do_bench(fn, warmup=10, rep=40)


def configs(quick: bool) -> list:
    """Default first, then larger tiles / deeper pipelines / longer token steps."""
    c = kb.BookkeepingConfig
    out = [None, c(128, 128, 128, 8, 8, 3, tma=False), c(128, 128, 128, 8, 8, 3),
           c(128, 128, 64, 8, 8, 4), c(128, 256, 64, 8, 8, 3, tma=False),
           c(128, 256, 64, 8, 8, 3)]
    if not quick:
        out += [c(128, 256, 64, 8, 8, 3, tma=False), c(128, 128, 128, 8, 4, 3),
                c(128, 256, 128, 8, 8, 2), c(128, 128, 128, 16, 8, 3), c(64, 256, 64, 8, 4, 4)]
    return out


@triton.jit
def _variant_kernel(a_ptr, g_ptr, scale_ptr, w_ptr, batch, seq, d, p, s_ab, s_at, s_gb, s_gt,
                    NESTED: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_P: tl.constexpr):
    """Diagnostic twins of kb._bookkeeping_fwd_kernel (16-bit, contiguous d / p, one layer):
    NESTED=False: one accumulator, no per-sample scale (the plain GEMM over B·T: what this load
    structure reaches); NESTED: a loop per sample with the scale after it (the pre-flat form)."""
    i_p, i_d = kb.grouped_tile(tl.program_id(0), p, d, BLOCK_P, BLOCK_D, GROUP_P)
    o_p = (i_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    o_d = (i_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    o_t = tl.arange(0, BLOCK_T)
    b_w = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    n_tt = tl.cdiv(seq, BLOCK_T)
    if NESTED:
        for i in range(0, batch):
            b_gi = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
            for j in range(0, n_tt):
                o_tt = (j * BLOCK_T + o_t).to(tl.int64)
                b_g = tl.load(g_ptr + i * s_gb + o_p[:, None] + o_tt[None, :] * s_gt)
                b_a = tl.load(a_ptr + i * s_ab + o_tt[:, None] * s_at + o_d[None, :])
                b_gi = tl.dot(b_g, b_a, b_gi)
            b_w += tl.load(scale_ptr + i) * b_gi
    else:
        for k in range(0, batch * n_tt):
            i = k // n_tt
            j = k - i * n_tt
            o_tt = (j * BLOCK_T + o_t).to(tl.int64)
            b_g = tl.load(g_ptr + i * s_gb + o_p[:, None] + o_tt[None, :] * s_gt)
            b_a = tl.load(a_ptr + i * s_ab + o_tt[:, None] * s_at + o_d[None, :])
            b_w = tl.dot(b_g, b_a, b_w)
    tl.store(w_ptr + o_p[:, None] * d + o_d[None, :], b_w)


def time_variant(a, g, s, nested, bt, warps=8, stages=3):
    bsz, seq, d = a.shape
    p = g.shape[2]
    w = torch.empty(p, d, device=a.device)
    grid = (triton.cdiv(p, 128) * triton.cdiv(d, 128),)

    def run():
        _variant_kernel[grid](a, g, s, w, bsz, seq, d, p, a.stride(0), a.stride(1), g.stride(0),
                              g.stride(1), NESTED=nested, BLOCK_P=128, BLOCK_D=128,
                              BLOCK_T=bt, GROUP_P=8, num_warps=warps, num_stages=stages)
    run()
    return _bench(run)


@triton.jit
def _tma_kernel(a_desc, g_desc, scale_ptr, w_ptr, batch, seq, d, p,
                SCALE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_T: tl.constexpr, GROUP_P: tl.constexpr, WS: tl.constexpr,
                PREFETCH: tl.constexpr, EPI: tl.constexpr):
    """TMA twin (16-bit, T a multiple of BLOCK_T, contiguous (B·T, n) operands, one layer): the
    tiles come by tensor-memory-access descriptors instead of per-thread cp.async; SCALE=False is
    the plain GEMM. WS asks Triton for warp specialisation (3.6 takes it on sm_90 for the plain
    GEMM at num_warps 4, not for a loop with the boundary's branch). PREFETCH: the next sample's
    scale is loaded at each sample boundary (a loop-carried scalar), so the boundary does not wait
    on a global load. EPI, the boundary's arithmetic: 0 a select, a multiply
    and an add per element (the kernel before the scalar branch); 1 a branch on the sample's scale
    and one fused multiply-add per element; 2 a fused multiply-add and a select per element; 3 as
    1, the partial reset by a select before the dot. H100 (gpu_h100_s17/c2_d1f7f23): 1 and 3 are
    slower than 0 (14-21% and 53-56% of torch.matmul against 72-81%)."""
    i_p, i_d = kb.grouped_tile(tl.program_id(0), p, d, BLOCK_P, BLOCK_D, GROUP_P)
    b_w = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    b_gi = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    n_tt = seq // BLOCK_T
    s_cur = tl.load(scale_ptr)
    for k in tl.range(0, batch * n_tt, warp_specialize=WS):
        i = k // n_tt
        j = k - i * n_tt
        row = k * BLOCK_T
        b_g = g_desc.load([row, i_p * BLOCK_P])  # [BT, BP]
        b_a = a_desc.load([row, i_d * BLOCK_D])  # [BT, BD]
        if SCALE:
            if EPI == 3:  # the reset as a select on a uniform condition (wgmma's use-C flag)
                b_gi = tl.dot(b_g.T, b_a, tl.where(j == 0, 0.0, b_gi))
            else:
                b_gi = tl.dot(b_g.T, b_a, b_gi)
            if j == n_tt - 1:
                if PREFETCH:
                    scale_i = s_cur
                    s_cur = tl.load(scale_ptr + tl.minimum(i + 1, batch - 1))
                else:
                    scale_i = tl.load(scale_ptr + i)
                if EPI == 0:  # per element: multiply, select, add
                    b_w += tl.where(scale_i != 0.0, scale_i * b_gi, 0.0)
                elif EPI == 2:  # per element: a fused multiply-add and a select, no branch
                    b_w = tl.where(scale_i != 0.0, tl.fma(b_gi, scale_i, b_w), b_w)
                elif scale_i != 0.0:  # one branch for the tile: one fused multiply-add
                    b_w = tl.fma(b_gi, scale_i, b_w)
                if EPI != 3:
                    b_gi = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        else:
            b_w = tl.dot(b_g.T, b_a, b_w)
    o_p = (i_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    o_d = (i_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    tl.store(w_ptr + o_p[:, None] * d + o_d[None, :], b_w,
             mask=(o_p < p)[:, None] & (o_d < d)[None, :])


def time_tma(a, g, s, scale, bt, stages=3, ws=False, bp=128, bd=128, warps=8, prefetch=False,
             epi=0):
    """ms of the TMA twin, and whether its sum equals bookkeeping_fwd's at the same token step."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    bsz, seq, d = a.shape
    p = g.shape[2]
    a2, g2 = a.reshape(-1, d), g.reshape(-1, p)
    a_desc = TensorDescriptor(a2, list(a2.shape), list(a2.stride()), [bt, bd])
    g_desc = TensorDescriptor(g2, list(g2.shape), list(g2.stride()), [bt, bp])
    w = torch.empty(p, d, device=a.device)
    grid = (triton.cdiv(p, bp) * triton.cdiv(d, bd),)

    def run():
        _tma_kernel[grid](a_desc, g_desc, s, w, bsz, seq, d, p, SCALE=scale, BLOCK_P=bp,
                          BLOCK_D=bd, BLOCK_T=bt, GROUP_P=8, WS=ws, PREFETCH=prefetch, EPI=epi,
                          num_warps=warps, num_stages=stages)
    run()
    same = None
    if scale:
        ref = torch.empty_like(w)
        kb.bookkeeping_fwd(a, g, s, ref, False, kb.BookkeepingConfig(128, 128, bt, 8, 8, stages))
        same = bool(torch.equal(ref, w))
    return _bench(run), same


def boundary_variants():
    """(name, time_tma kwargs): the per-sample boundary's cost at the default 128x256x64 tile
    (its arithmetic, the scale loaded ahead) and at 128x128 tiles (two accumulators, no spill)."""
    out = [("plain 128x256x64 w8 s3", dict(scale=False, bt=64, bp=128, bd=256))]
    for epi in (0, 2, 1, 3):
        out.append((f"scaled epi{epi} 128x256x64 w8 s3",
                    dict(scale=True, bt=64, bp=128, bd=256, epi=epi)))
    out.append(("scaled epi1 prefetch 128x256x64 w8 s3",
                dict(scale=True, bt=64, bp=128, bd=256, epi=1, prefetch=True)))
    out.append(("scaled epi1 128x128x64 w8 s4",
                dict(scale=True, bt=64, bp=128, bd=128, stages=4, epi=1)))
    # the kernel's form (epi2) with a deeper pipeline, and with a token step of 128 (fewer
    # iterations, the same boundaries)
    out.append(("scaled epi2 128x256x64 w8 s4",
                dict(scale=True, bt=64, bp=128, bd=256, stages=4, epi=2)))
    out.append(("scaled epi2 128x256x128 w8 s2",
                dict(scale=True, bt=128, bp=128, bd=256, stages=2, epi=2)))
    return out


def ws_plain_variants():
    """(name, time_tma kwargs): the plain GEMM (no scale) as the kernel's TMA tiles and
    warp-specialised by Triton (a loop without a branch: its sm_90 pass takes it at num_warps 4;
    a producer and two consumer warp groups). H100 (gpu_h100_s18/c1_fd6a5c6): 68-75% of
    torch.matmul at 128 x 128, and 128 x 256 does not fit shared memory; a warp-specialised
    book-keeping (a loop per sample, fd6a5c6, removed) gave 63-76%, below the flat kernel."""
    return [("plain 128x256x64 w8 s3", dict(scale=False, bt=64, bp=128, bd=256)),
            ("plain ws 128x128x64 w4 s3",
             dict(scale=False, bt=64, bp=128, bd=128, ws=True, warps=4)),
            ("plain ws 128x256x64 w4 s3",
             dict(scale=False, bt=64, bp=128, bd=256, ws=True, warps=4))]


def copy_variants():
    return [(64, 64, 4), (32, 128, 4), (128, 32, 4), (64, 128, 8), (128, 64, 8), (32, 32, 2)]


def time_copy(x, block_t, block_n, warps):
    bsz, seq, n = x.shape
    y = torch.empty(bsz, n, seq, device=x.device)
    grid = (triton.cdiv(seq, block_t) * triton.cdiv(n, block_n), bsz, 1)

    def run():
        kb._kmajor_tf32_kernel[grid](x, y, seq, n, x.stride(0), x.stride(1), x.stride(2), 0,
                                     TABLE=False, BLOCK_T=block_t, BLOCK_N=block_n,
                                     num_warps=warps)
    run()
    ref = kb.kmajor_tf32_copy(x)
    assert torch.equal(y.transpose(1, 2).view(torch.int32), ref.view(torch.int32))
    ms = _bench(run)
    return ms, 2 * x.numel() * 4 / ms / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="16x256,8x512")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", action="store_true", help="bf16: the diagnostic twins too")
    ap.add_argument("--no-copy", action="store_true", help="skip the K-major copy timings")
    ap.add_argument("--tma", action="store_true", help="bf16: the TMA twins too")
    ap.add_argument("--no-configs", action="store_true", help="skip the config sweep")
    ap.add_argument("--boundary", action="store_true",
                    help="bf16: TMA twins of the per-sample boundary (its arithmetic, the scale "
                         "loaded ahead, smaller tiles, deeper pipelines)")
    ap.add_argument("--ws", action="store_true",
                    help="bf16: the plain GEMM twins, flat and warp-specialised")
    ap.add_argument("--graph", action="store_true",
                    help="time CUDA-graph replays (GPU time without the host's launch path)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    global GRAPH
    GRAPH = args.graph
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
                mm = _bench(lambda: torch.matmul(g2.t(), a2))
                torch.backends.cuda.matmul.allow_tf32 = False
                ref = None
                for cfg in configs(args.quick)[:1 if args.no_configs else None]:
                    run = lambda: kb.bookkeeping_fwd(a_k, g_k, s, w, False, cfg,  # noqa: E731
                                                     fp32_mode="tf32r", pre_rounded=pre)
                    try:
                        run()
                        if ref is None:
                            ref = w.clone()
                        same = bool(torch.equal(w, ref))
                        ms = _bench(run)
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
                if not pre and args.variants:
                    for nested, bt in ((False, 64), (False, 128), (True, 64), (True, 128)):
                        ms = time_variant(a, g, s, nested, bt)
                        rows.append(dict(case=case, d=d, p=p, dtype=dt, ms=ms,
                                         config=f"variant {'nested' if nested else 'plain'} "
                                                f"BLOCK_T={bt}", tflops=flops / ms / 1e9,
                                         matmul_ms=mm, of_matmul=mm / ms))
                        print(f"{case} {d}->{p} {rows[-1]['config']}: {ms:.4f} ms "
                              f"{flops / ms / 1e9:.0f} TF/s ({mm / ms:.0%} of matmul)", flush=True)
                if not pre and args.tma:
                    for scale, bt, st in ((False, 64, 3), (False, 64, 4), (True, 64, 3),
                                          (True, 64, 4), (True, 128, 3), (False, 128, 3)):
                        ms, same = time_tma(a, g, s, scale, bt, st)
                        name = f"tma {'scaled' if scale else 'plain'} BLOCK_T={bt} stages={st}"
                        rows.append(dict(case=case, d=d, p=p, dtype=dt, ms=ms, config=name,
                                         tflops=flops / ms / 1e9, matmul_ms=mm,
                                         of_matmul=mm / ms, bit_identical=same))
                        print(f"{case} {d}->{p} {name}: {ms:.4f} ms {flops / ms / 1e9:.0f} TF/s "
                              f"({mm / ms:.0%} of matmul) same={same}", flush=True)
                twins = (boundary_variants() if args.boundary else []) + \
                    (ws_plain_variants() if args.ws else [])
                if not pre and twins:
                    for name, kw in twins:
                        try:
                            ms, same = time_tma(a, g, s, **kw)
                        except Exception as e:  # out of shared memory / registers
                            print(f"{case} {d}->{p} {name}: {str(e)[:120]}", flush=True)
                            continue
                        rows.append(dict(case=case, d=d, p=p, dtype=dt, ms=ms, config=name,
                                         tflops=flops / ms / 1e9, matmul_ms=mm,
                                         of_matmul=mm / ms, bit_identical=same))
                        print(f"{case} {d}->{p} {name}: {ms:.4f} ms {flops / ms / 1e9:.0f} TF/s "
                              f"({mm / ms:.0%} of matmul) same={same}", flush=True)
                if pre and d == 2048 and not args.no_copy:  # the copy: once per width
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
