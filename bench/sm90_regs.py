"""Registers, spills and shared memory of the book-keeping kernel compiled for the H100, on any host.

    python bench/sm90_regs.py                      # the configs below, bf16 and fp32
    python bench/sm90_regs.py --dtypes bf16 --configs 0,2 --json out.json

Run it without TRITON_INTERPRET (the interpreter's kernels cannot be compiled).

Triton compiles a kernel for a target without a GPU: this builds `_bookkeeping_fwd_kernel` for
sm_90 (Hopper) with the launch's constexprs, runs the ptxas that ships with Triton on its PTX
(`-v`) and reports per config: registers per thread, bytes of spill stores / loads, shared memory,
and whether Triton warp-specialised it. Spills are where the per-sample form pays: two fp32
accumulators of a [BLOCK_P, BLOCK_D] tile (the sample's partial and the running sum) take
2·BP·BD / (32·num_warps) registers a thread, 256 for 128 x 256 tiles on 8 warps, the whole
register file, before addresses and pipeline state (bench/results/gpu_h100_s18/README.md).
No device time: use it to screen a kernel change before a GPU call.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dpkern.kernels import bookkeeping as kb

# (BLOCK_P, BLOCK_D, BLOCK_T, num_warps, num_stages, TMA): the heuristic's forms first
CONFIGS = ((128, 256, 64, 8, 3, True), (128, 128, 128, 8, 3, False), (128, 128, 64, 8, 3, True),
           (128, 128, 64, 8, 3, False), (64, 64, 64, 4, 3, False))
_DT = {"bf16": ("*bf16", tl.bfloat16), "fp32": ("*fp32", tl.float32)}


def compile_sm90(cfg: tuple, dtype: str) -> dict:
    """One config's report: {"regs", "spill_stores", "spill_loads", "shared", "warp_specialized"}.
    dtype "fp32" compiles the TF32 form the engine launches on pre-rounded K-major copies."""
    bp, bd, bt, warps, stages, tma = cfg
    ptr, elt = _DT[dtype]
    sig = {"a_ptr": ptr, "g_ptr": ptr, "scale_ptr": "*fp32", "w_ptr": "*fp32",
           "batch": "i32", "seq": "i32", "d": "i32", "p": "i32",
           "stride_ab": "i64", "stride_at": "i64", "stride_ad": "i64",
           "stride_gb": "i64", "stride_gt": "i64", "stride_gp": "i64",
           "stride_wp": "i64", "stride_wd": "constexpr"}
    consts = dict(stride_wd=1, ACCUMULATE=False, BLOCK_P=bp, BLOCK_D=bd, BLOCK_T=bt, GROUP_P=8,
                  UPCAST=False, DOT_PREC="tf32", ROUND=False, TABLE=False, ELT=elt,
                  W_ELT=tl.float32, TMA=tma and dtype == "bf16")
    if consts["TMA"]:  # row-major (B·T, n) operands: unit last strides
        consts.update(stride_ad=1, stride_gp=1)
    sig.update({k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(fn=kb._bookkeeping_fwd_kernel, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(k.asm["ptx"])
        log = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(src), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True,
                             check=True).stderr
    return parse_ptxas(log) | {"shared": k.metadata.shared,
                               "warp_specialized": "ttg.warp_specialize" in k.asm["ttgir"]}


def parse_ptxas(log: str) -> dict:
    """ptxas -v's registers and spill bytes (the kernel's one function)."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise ValueError(f"no register report in ptxas output: {log[-300:]!r}")
    return {"regs": int(regs.group(1)), "spill_stores": int(spill.group(1)),
            "spill_loads": int(spill.group(2))}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--configs", default=None, help="comma list of indices into CONFIGS")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("TRITON_INTERPRET is set: the interpreter's kernels cannot be compiled; unset it")
    pick = CONFIGS if args.configs is None else [CONFIGS[int(i)] for i in args.configs.split(",")]
    rows = []
    for dt in args.dtypes.split(","):
        for cfg in pick:
            if cfg[-1] and dt != "bf16":
                continue  # TMA tiles are 16-bit only
            r = {"dtype": dt, "config": "{}x{}x{} w{} s{}{}".format(*cfg[:5], " tma" * cfg[5])}
            r |= compile_sm90(cfg, dt)
            rows.append(r)
            print(f"{dt} {r['config']:<22} regs {r['regs']:>3}  spill stores {r['spill_stores']:>5}"
                  f" loads {r['spill_loads']:>5}  shared {r['shared']:>6}"
                  f"{'  ws' if r['warp_specialized'] else ''}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
