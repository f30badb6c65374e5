"""fp32 per-sample kernels: sensitivity-exact TF32 ("tf32r": operands rounded in the kernel) vs
operands rounded once in memory then plain TF32 dots (same products), T-strided or T-contiguous
(kmajor_tf32_copy: rounded in the copy), vs cuBLAS TF32.

    python bench/tf32_probe.py [--out FILE]

Headline Linear shape of bench/e2e_step.py (B=8, T=512, d=2048, p=2048 and 5632). Prints ms and
TFLOP/s per variant; checks that the pre-rounded variant gives bit-identical results to "tf32r".
"""
import argparse
import json

import torch
import triton.testing

from dpkern.kernels.bookkeeping import bookkeeping_fwd
from dpkern.kernels.ghost_norm import ghost_norm_fwd
from dpkern.ops._persample import round_tf32


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for bsz, seq, d, p in ((8, 512, 2048, 2048), (8, 512, 2048, 5632), (8, 128, 2048, 5632)):
        a = torch.randn(bsz, seq, d, device="cuda")
        g = torch.randn(bsz, seq, p, device="cuda")
        s = torch.rand(bsz, device="cuda")
        ar, gr = round_tf32(a), round_tf32(g)
        w = torch.empty(p, d, device="cuda")
        flops = 2.0 * bsz * seq * d * p
        res = {}

        def bk(x, y, mode):
            bookkeeping_fwd(x, y, s, w, accumulate=False, fp32_mode=mode)
            return w.clone()
        ref = bk(a, g, "tf32r")
        same = torch.equal(bk(ar, gr, "tf32"), ref)
        res["bookkeeping tf32r"] = triton.testing.do_bench(lambda: bk(a, g, "tf32r"))
        res["bookkeeping pre-rounded + tf32"] = triton.testing.do_bench(lambda: bk(ar, gr, "tf32"))
        # wgmma's TF32 form needs K-major operands; a (B,T,d) and g (B,T,p) are T-strided. Views of
        # T-contiguous copies give the kernel K-major tiles (Triton specializes stride 1).
        a_k = a.transpose(1, 2).contiguous().transpose(1, 2)
        g_k = g.transpose(1, 2).contiguous().transpose(1, 2)
        same_k = torch.equal(bk(a_k, g_k, "tf32r"), ref)
        res["bookkeeping tf32r, T-contiguous operands"] = triton.testing.do_bench(
            lambda: bk(a_k, g_k, "tf32r"))
        from dpkern.kernels.bookkeeping import kmajor_tf32_copy
        a_r, g_r = kmajor_tf32_copy(a), kmajor_tf32_copy(g)

        def bk_pre(x, y):
            bookkeeping_fwd(x, y, s, w, accumulate=False, fp32_mode="tf32r", pre_rounded=True)
            return w.clone()
        same_kr = torch.equal(bk_pre(a_r, g_r), ref)
        res["bookkeeping T-contiguous pre-rounded + tf32"] = triton.testing.do_bench(
            lambda: bk_pre(a_r, g_r))
        res["T-contiguous rounding copies of a and g (kmajor_tf32_copy)"] = triton.testing.do_bench(
            lambda: (kmajor_tf32_copy(a), kmajor_tf32_copy(g)))
        from dpkern.ops.bookkeeping import bookkeeping_wgrad
        res["bookkeeping_wgrad (op: copies + kernel)"] = triton.testing.do_bench(
            lambda: bookkeeping_wgrad(a, g, s, out=w, backend="triton", fp32_mode="tf32r"))
        res["T-contiguous copies of a and g (torch)"] = triton.testing.do_bench(
            lambda: (a.transpose(1, 2).contiguous(), g.transpose(1, 2).contiguous()))
        res["round_tf32(a) + round_tf32(g) (torch)"] = triton.testing.do_bench(
            lambda: (round_tf32(a), round_tf32(g)))
        torch.backends.cuda.matmul.allow_tf32 = True
        a2, g2 = a.reshape(-1, d), g.reshape(-1, p)
        res["cuBLAS TF32 g^T a"] = triton.testing.do_bench(lambda: g2.t() @ a2)
        torch.backends.cuda.matmul.allow_tf32 = False
        outs = [torch.empty(bsz, device="cuda")]
        ghost_norm_fwd(a, [g], outs, fp32_mode="tf32r")
        n_ref = outs[0].clone()
        ghost_norm_fwd(ar, [gr], outs, fp32_mode="tf32")
        same_n = torch.equal(outs[0], n_ref)
        res["ghost tf32r"] = triton.testing.do_bench(lambda: ghost_norm_fwd(a, [g], outs, fp32_mode="tf32r"))
        res["ghost pre-rounded + tf32"] = triton.testing.do_bench(
            lambda: ghost_norm_fwd(ar, [gr], outs, fp32_mode="tf32"))
        for k, ms in res.items():
            timed_gemm = k.startswith("bookkeeping") or k.startswith("cuBLAS")
            rows.append({"shape": [bsz, seq, d, p], "variant": k, "ms": ms,
                         "tflops": flops / ms / 1e9 if timed_gemm else None})
            print(f"B{bsz} T{seq} d{d} p{p}  {k:40s} {ms:8.4f} ms"
                  + (f"  {flops / ms / 1e9:6.1f} TFLOP/s" if rows[-1]["tflops"] else ""))
        print(f"  pre-rounded bookkeeping bit-identical to tf32r: {same}; ghost: {same_n}; "
              f"T-contiguous: {same_k}; T-contiguous pre-rounded: {same_kr}")
        rows.append({"shape": [bsz, seq, d, p], "bit_identical_bookkeeping": same,
                     "bit_identical_ghost": same_n, "bit_identical_t_contiguous": same_k,
                     "bit_identical_t_contiguous_pre_rounded": same_kr})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
