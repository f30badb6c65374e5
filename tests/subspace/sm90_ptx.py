"""Compile the subspace projection and back-projection kernels for sm_90 on any machine (no GPU
needed) and count their global-memory loads and stores by width, for the single-layer launch and
the tabled one (pointer tables over layers, kernels/subspace_proj.py).

    python tests/subspace/sm90_ptx.py     # last line: {name: {"single": {...}, "table": {...}}}

Run without TRITON_INTERPRET (test_grouped_launches.py starts it in a subprocess): a tabled
kernel must read its operands as wide as the single-layer one, which it only does when the
compiler knows the loaded pointers are 16-byte aligned."""
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

from dpkern.kernels import subspace_backproj as sb  # noqa: E402
from dpkern.kernels import subspace_proj as sp  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# kernel, constexprs (TABLE added per variant), innermost strides (1: specialised as a constant),
# pointer dtypes of the single-layer launch, pointers never tabled, launch options
KERNELS = {
    "proj": (sp._subspace_proj_fwd_kernel,
             dict(BLOCK_T=32, BLOCK_K=128, BLOCK_RU=16, BLOCK_RV=16, PRECISION="tf32",
                  A_ELT=tl.bfloat16, G_ELT=tl.bfloat16, U_ELT=tl.float32, V_ELT=tl.float32),
             ("stride_ad", "stride_gp", "stride_ur", "stride_vr"),
             {"a_ptr": "*bf16", "g_ptr": "*bf16", "u_ptr": "*fp32", "v_ptr": "*fp32",
              "row_ptr": "*fp32", "part_ptr": "*fp32"},
             ("part_ptr",), dict(num_warps=4)),
    "backproj": (sb._subspace_backproj_fwd_kernel,
                 dict(OPT=2, DECOUPLED=True, NESTEROV=False, FIRST=False, S_ALIGNED=True,
                      BLOCK_P=64, BLOCK_D=64, BLOCK_K=32, BLOCK_RV=16, PRECISION="ieee",
                      W_ELT=tl.bfloat16, M_ELT=tl.float32, Q_ELT=tl.float32),
                 ("stride_ur", "stride_sc", "stride_vr"),
                 {"w_ptr": "*bf16", "u_ptr": "*fp32", "s_ptr": "*fp32", "v_ptr": "*fp32",
                  "m_ptr": "*fp32", "q_ptr": "*fp32"},
                 (), dict(num_warps=4)),
}
_FLOAT_ARGS = {"lr", "weight_decay", "decay", "momentum", "one_minus_damp", "beta1", "beta2",
               "one_minus_beta1", "one_minus_beta2", "eps", "step_size", "inv_sqrt_bc2"}


def _count(pattern: str, ptx: str, kind: str, counts: dict) -> None:
    for m in re.finditer(pattern, ptx):
        mods = m.group(1).split(".")
        width = next((x for x in mods if x in ("v2", "v4", "v8")), "v1")
        bits = next((x for x in mods if re.fullmatch(r"[bfsu](8|16|32|64)", x)), "?")
        counts[f"{kind}.{width}.{bits}"] = counts.get(f"{kind}.{width}.{bits}", 0) + 1


def counts(name: str, table: bool) -> dict:
    """{instruction: count} of global loads / stores / cp.async of one kernel variant."""
    fn, consts, unit_strides, ptr_types, untabled, opts = KERNELS[name]
    aligned = make_backend(TARGET).parse_attr("D")  # what Triton assumes of an aligned argument
    sig, constexprs, attrs = {}, dict(consts, TABLE=table), {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in unit_strides:
            sig[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg.endswith("_ptr"):
            sig[arg] = "*i64" if table and arg not in untabled else ptr_types[arg]
            attrs[(i,)] = aligned
        elif arg in _FLOAT_ARGS:
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
            attrs[(i,)] = aligned
    ptx = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=TARGET,
                         options=opts).asm["ptx"]
    out: dict = {}
    _count(r"ld\.global((?:\.[a-z0-9]+)*)\s", ptx, "ld", out)
    _count(r"st\.global((?:\.[a-z0-9]+)*)\s", ptx, "st", out)
    for m in re.finditer(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx):
        key = f"cp.async.{int(m.group(1), 0)}"
        out[key] = out.get(key, 0) + 1
    return out


if __name__ == "__main__":
    print(json.dumps({n: {"single": counts(n, False), "table": counts(n, True)}
                      for n in KERNELS}))
