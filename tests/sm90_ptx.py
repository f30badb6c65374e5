"""Compile the kernels that have a tabled form (pointer tables over layers, kernels/_tables.py)
for sm_90 on any machine (no GPU needed) and count their global-memory loads and stores by width,
for the single-layer launch and the tabled one.

    python tests/sm90_ptx.py [name ...]   # last line: {name: {"single": {...}, "table": {...}}}

Tests call `tabled_load_counts`, which runs this file without TRITON_INTERPRET: a tabled kernel
must read its operands as wide as the single-layer one, which it only does when the compiler knows
the loaded pointers are 16-byte aligned (on the pointer itself: a hint on the int64 is lost at the
int-to-pointer cast, and every load became a scalar one)."""
import json
import os
import re
import sys

import triton.language as tl

from dpkern.kernels import bookkeeping, ghost_norm, row_norm_dots, tensor_norms
from dpkern.kernels import subspace_backproj as sb
from dpkern.kernels import subspace_proj as sp

# kernel, constexprs (TABLE added per variant), innermost strides (1: specialised as a constant),
# pointer dtypes of the single-layer launch (default bf16), pointers never tabled, launch options
KERNELS = {
    "bookkeeping": (bookkeeping._bookkeeping_fwd_kernel,
                    dict(ACCUMULATE=False, BLOCK_P=128, BLOCK_D=128, BLOCK_T=64, GROUP_P=8,
                         UPCAST=False, DOT_PREC="ieee", ROUND=False, ELT=tl.bfloat16,
                         W_ELT=tl.bfloat16, TMA=False),
                    ("stride_ad", "stride_gp", "stride_wd"), {"scale_ptr": "*fp32"}, (),
                    dict(num_warps=8, num_stages=3)),
    "ghost_norm": (ghost_norm._ghost_norm_fwd_kernel,
                   dict(NUM_G=3, BLOCK_T=64, BLOCK_K=64, UPCAST=False, DOT_PREC="ieee",
                        ROUND=False, ELT=tl.bfloat16),
                   ("stride_ad", "stride_g0p", "stride_g1p", "stride_g2p"),
                   {"pairs_ptr": "*i32", "part_ptr": "*fp32"}, ("pairs_ptr", "part_ptr"),
                   dict(num_warps=4, num_stages=3)),
    "row_norm_dots": (row_norm_dots._row_norm_dots_kernel,
                      dict(NUM_G=3, BLOCK_T=32, BLOCK_C=128, ELT=tl.bfloat16),
                      ("stride_ad", "stride_g0p", "stride_g1p", "stride_g2p"),
                      {"part_ptr": "*fp32"}, ("part_ptr",), dict(num_warps=4, num_stages=2)),
    "proj": (sp._subspace_proj_fwd_kernel,
             dict(BLOCK_T=32, BLOCK_K=128, BLOCK_RU=16, BLOCK_RV=16, PRECISION="tf32",
                  A_ELT=tl.bfloat16, G_ELT=tl.bfloat16, U_ELT=tl.float32, V_ELT=tl.float32),
             ("stride_ad", "stride_gp", "stride_ur", "stride_vr"),
             {"u_ptr": "*fp32", "v_ptr": "*fp32", "row_ptr": "*fp32", "part_ptr": "*fp32"},
             ("part_ptr",), dict(num_warps=4)),
    "backproj": (sb._subspace_backproj_fwd_kernel,
                 dict(OPT=2, DECOUPLED=True, NESTEROV=False, FIRST=False, S_ALIGNED=True,
                      BLOCK_P=64, BLOCK_D=64, BLOCK_K=32, BLOCK_RV=16, PRECISION="ieee",
                      W_ELT=tl.bfloat16, M_ELT=tl.float32, Q_ELT=tl.float32),
                 ("stride_ur", "stride_sc", "stride_vr"),
                 {"u_ptr": "*fp32", "s_ptr": "*fp32", "v_ptr": "*fp32", "m_ptr": "*fp32",
                  "q_ptr": "*fp32"}, (), dict(num_warps=4)),
    "kmajor_copy": (bookkeeping._kmajor_tf32_kernel, dict(BLOCK_T=64, BLOCK_N=64),
                    ("stride_xn",), {"x_ptr": "*fp32", "y_ptr": "*fp32"}, ("y_ptr",),
                    dict(num_warps=4)),
}
# kernels that always read their tensors through a table (no TABLE switch: both variants alike)
_TN = {"tab_ptr": "*i64", "partial_ptr": "*fp64", "out_ptr": "*fp64", "scale_ptr": "*fp32",
       "keep_ptr": "*i1"}
KERNELS["tensor_sumsq"] = (tensor_norms._sumsq_chunks_kernel,
                           dict(CHUNK=tensor_norms.CHUNK, BLOCK=tensor_norms.BLOCK, L_POW2=256),
                           (), _TN, (), dict(num_warps=8))
KERNELS["tensor_scale"] = (tensor_norms._scale_chunks_kernel,
                           dict(CHUNK=tensor_norms.CHUNK, BLOCK=tensor_norms.BLOCK, L_POW2=256,
                                ACC=False), (), _TN, (), dict(num_warps=8))
KERNELS["tensor_scale_acc"] = (KERNELS["tensor_scale"][0],
                               dict(KERNELS["tensor_scale"][1], ACC=True), *KERNELS["tensor_scale"][2:])
# the book-keeping's TMA form (16-bit tiles on Hopper): the same kernel, its launch config
_bk = KERNELS["bookkeeping"]
KERNELS["bookkeeping_tma"] = (_bk[0], dict(_bk[1], BLOCK_D=256, TMA=True), *_bk[2:])
_FLOAT_ARGS = {"lr", "weight_decay", "decay", "momentum", "one_minus_damp", "beta1", "beta2",
               "one_minus_beta1", "one_minus_beta2", "eps", "step_size", "inv_sqrt_bc2"}


def _count(pattern: str, ptx: str, kind: str, out: dict) -> None:
    for m in re.finditer(pattern, ptx):
        mods = m.group(1).split(".")
        width = next((x for x in mods if x in ("v2", "v4", "v8")), "v1")
        bits = next((x for x in mods if re.fullmatch(r"[bfsu](8|16|32|64)", x)), "?")
        out[f"{kind}.{width}.{bits}"] = out.get(f"{kind}.{width}.{bits}", 0) + 1


def counts(name: str, table: bool) -> dict:
    """{instruction: count} of global loads / stores / cp.async of one kernel variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    target = GPUTarget("cuda", 90, 32)
    fn, consts, unit_strides, ptr_types, untabled, opts = KERNELS[name]
    aligned = make_backend(target).parse_attr("D")  # what Triton assumes of an aligned argument
    sig, attrs = {}, {}
    constexprs = dict(consts, TABLE=table) if "TABLE" in fn.arg_names else dict(consts)
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in unit_strides:
            sig[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg.endswith("_ptr"):
            sig[arg] = ("*i64" if table and arg not in untabled and "TABLE" in fn.arg_names
                        else ptr_types.get(arg, "*bf16"))
            attrs[(i,)] = aligned
        elif arg in _FLOAT_ARGS:
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
            attrs[(i,)] = aligned
    ptx = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target,
                         options=opts).asm["ptx"]
    out: dict = {}
    _count(r"ld\.global((?:\.[a-z0-9]+)*)\s", ptx, "ld", out)
    _count(r"st\.global((?:\.[a-z0-9]+)*)\s", ptx, "st", out)
    n_tma = len(re.findall(r"cp\.async\.bulk\.tensor\.", ptx))
    if n_tma:
        out["tma"] = n_tma
    for m in re.finditer(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx):
        key = f"cp.async.{int(m.group(1), 0)}"
        out[key] = out.get(key, 0) + 1
    return out


def tabled_load_counts(names: list) -> dict:
    """This file run for `names` in a fresh interpreter without TRITON_INTERPRET (pytest sets it);
    skips the calling test when Triton has no NVIDIA backend."""
    import subprocess

    import pytest
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, __file__, *names], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("sm90_ptx.py compiles real kernels: run it without TRITON_INTERPRET=1")
    names = sys.argv[1:] or list(KERNELS)
    print(json.dumps({n: {"single": counts(n, False), "table": counts(n, True)} for n in names}))
