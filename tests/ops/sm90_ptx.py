"""Compile a per-sample kernel for sm_90 on any machine (no GPU needed) and count its global-memory
loads by width, for the single-layer launch and the tabled one (kernels/_tables.py).

    python tests/ops/sm90_ptx.py [bookkeeping ...]   # {name: {"single": {...}, "table": {...}}}

Run without TRITON_INTERPRET (tests/ops/test_grouped.py starts it in a subprocess): a tabled kernel
must read its operands as wide as the single-layer one, which it only does when the compiler knows
the loaded pointers are 16-byte aligned."""
import json
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("sm90_ptx.py compiles real kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402

from dpkern.kernels import bookkeeping, ghost_norm, row_norm_dots  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# kernel, its constexprs (TABLE added per variant), the innermost strides (1: Triton specialises
# a stride of 1 as a constant), pointer dtypes of the single-layer launch, launch options
KERNELS = {
    "bookkeeping": (bookkeeping._bookkeeping_fwd_kernel,
                    dict(ACCUMULATE=False, BLOCK_P=128, BLOCK_D=128, BLOCK_T=64, GROUP_P=8,
                         UPCAST=False, DOT_PREC="ieee", ROUND=False, ELT=tl.bfloat16,
                         W_ELT=tl.bfloat16),
                    ("stride_ad", "stride_gp", "stride_wd"),
                    {"scale_ptr": "*fp32"}, dict(num_warps=8, num_stages=3)),
    "ghost_norm": (ghost_norm._ghost_norm_fwd_kernel,
                   dict(NUM_G=3, BLOCK_T=64, BLOCK_K=64, UPCAST=False, DOT_PREC="ieee", ROUND=False,
                        ELT=tl.bfloat16),
                   ("stride_ad", "stride_g0p", "stride_g1p", "stride_g2p"),
                   {"pairs_ptr": "*i32", "part_ptr": "*fp32"}, dict(num_warps=8, num_stages=3)),
    "row_norm_dots": (row_norm_dots._row_norm_dots_kernel,
                      dict(NUM_G=3, BLOCK_T=32, BLOCK_C=128, ELT=tl.bfloat16),
                      ("stride_ad", "stride_g0p", "stride_g1p", "stride_g2p"),
                      {"part_ptr": "*fp32"}, dict(num_warps=4, num_stages=2)),
}
# operands that travel in the table when TABLE is set (the others stay plain pointers)
_UNTABLED = ("pairs_ptr", "part_ptr")


def load_counts(name: str, table: bool) -> dict:
    fn, consts, unit_strides, ptr_types, opts = KERNELS[name]
    backend = make_backend(TARGET)
    aligned = backend.parse_attr("D")  # what Triton assumes of a 16-byte aligned argument
    sig, constexprs, attrs = {}, dict(consts, TABLE=table), {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in unit_strides:
            sig[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg.endswith("_ptr"):
            sig[arg] = ("*i64" if table and arg not in _UNTABLED
                        else ptr_types.get(arg, "*bf16"))
            attrs[(i,)] = aligned
        else:
            sig[arg] = "i32"
            attrs[(i,)] = aligned
    ptx = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=TARGET, options=opts).asm["ptx"]
    counts = {}
    for m in re.finditer(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx):
        key = f"cp.async.{int(m.group(1), 0)}"
        counts[key] = counts.get(key, 0) + 1
    for m in re.finditer(r"ld\.global((?:\.[a-z0-9]+)*)\s", ptx):
        mods = m.group(1).split(".")
        width = next((x for x in mods if x in ("v2", "v4", "v8")), "v1")
        bits = next((x for x in mods if re.fullmatch(r"[bfsu](8|16|32|64)", x)), "?")
        key = f"ld.{width}.{bits}"
        counts[key] = counts.get(key, 0) + 1
    return counts


if __name__ == "__main__":
    print(json.dumps({name: {"single": load_counts(name, False), "table": load_counts(name, True)}
                      for name in sys.argv[1:] or KERNELS}))
