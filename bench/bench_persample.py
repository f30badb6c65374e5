"""Per-sample norm and book-keeping kernels against their rooflines.

* Norm kernels (ghost, instantiation, embedding): TFLOP/s of the FLOP model of the method as run,
  next to the dense bf16 matmul rate measured at the start of the run (aim: ≥ 50% at d=p ≥ 2048,
  T=512). `frac_of_bf16_matmul` is attached to each case.
* Book-keeping: the clipped weight gradient against torch.matmul computing the non-private weight
  gradient gᵀa on the same shapes and dtype (aim: ≥ 90% of its rate); backend "matmul" is that
  baseline, in the same JSON.
* On a GPU, one sweep over each kernel's config search space at the headline shape records the best
  config (`best_config`), so the heuristics can be tuned from one run.
Every case checks its output against the reference first: a wrong kernel is never timed.
"""
import dataclasses

import pytest
import torch

from bench import registry
from bench.conftest import HAS_GPU
from dpkern.ops.bookkeeping import bookkeeping_wgrad
from dpkern.ops.embedding_norm import embedding_norm_sq
from dpkern.ops.linear_norm import linear_norm_flops, linear_norm_sq
from dpkern.reference.persample import (bookkeeping_wgrad_ref, embedding_norm_sq_ref,
                                        linear_norm_sq_ref)

DEV = registry.DEVICE
# (B, T, d, p): the Llama-1B projections at the batch shapes, a long sequence, a wide MLP
LINEAR_CASES = registry.shapes("linear_norm_sq")
BOOKKEEPING_CASES = registry.shapes("bookkeeping_wgrad")
EMB_CASES = registry.shapes("embedding_norm_sq")
HEADLINE = registry.shapes("headline", quick=False)[0]
DTYPES = registry.torch_dtypes("linear_norm_sq")[::-1]  # bf16 first (ids as before)
NORM_BACKENDS = ["triton", "torch"]  # quick mode: Triton under TRITON_INTERPRET


def _check_norm(out, ref):
    torch.testing.assert_close(out.double(), ref.double(), rtol=1e-4, atol=0)  # not reported if wrong


def _attach(info, **kw):
    info.update(kw)
    if "tflops" in info and "bf16_tflops" in info:
        info["frac_of_bf16_matmul"] = info["tflops"] / info["bf16_tflops"]


@pytest.mark.parametrize("backend", NORM_BACKENDS)
@pytest.mark.parametrize("method", ["ghost", "instantiate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_CASES, ids=lambda s: "B{}xT{}xd{}xp{}".format(*s))
def test_linear_norm_bench(timed, shape, dtype, method, backend):
    b, t, d, p = shape
    a = torch.randn(b, t, d, device=DEV).to(dtype)
    g = torch.randn(b, t, p, device=DEV).to(dtype)
    ref = linear_norm_sq(a, g, method="instantiate", backend="torch")  # exact fp32 bmm
    _check_norm(linear_norm_sq(a, g, method=method, backend=backend), ref)
    flops = b * linear_norm_flops(t, d, p, method, backend)
    info = timed(lambda: linear_norm_sq(a, g, method=method, backend=backend), flops=flops)
    _attach(info, op="linear_norm_sq", method=method, backend=backend, dtype=str(dtype),
            shape=list(shape), flops=flops)


@pytest.mark.parametrize("backend", ["triton", "torch", "matmul"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BOOKKEEPING_CASES, ids=lambda s: "B{}xT{}xd{}xp{}".format(*s))
def test_bookkeeping_bench(timed, shape, dtype, backend):
    b, t, d, p = shape
    a = torch.randn(b, t, d, device=DEV).to(dtype)
    g = torch.randn(b, t, p, device=DEV).to(dtype)
    scale = torch.rand(b, device=DEV)
    grad = torch.zeros(p, d, device=DEV, dtype=dtype)
    flops = 2 * b * t * d * p
    if backend == "matmul":  # the non-private weight gradient, as autograd computes it
        a2, g2 = a.reshape(-1, d), g.reshape(-1, p)
        fn = lambda: torch.matmul(g2.t(), a2, out=grad)  # noqa: E731
        info = timed(fn, flops=flops, baseline=True)
    else:
        def check():
            ref = bookkeeping_wgrad_ref(a.float(), g.float(), scale)
            out = bookkeeping_wgrad(a, g, scale, backend=backend)
            torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
        fn = lambda: bookkeeping_wgrad(a, g, scale, out=grad, backend=backend)  # noqa: E731
        info = timed(fn, flops=flops, check=check)
    _attach(info, op="bookkeeping_wgrad", backend=backend, dtype=str(dtype), shape=list(shape),
            flops=flops)


@pytest.mark.parametrize("backend", NORM_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", EMB_CASES, ids=lambda s: "B{}xT{}xd{}xV{}".format(*s))
def test_embedding_norm_bench(timed, shape, dtype, backend):
    b, t, d, vocab = shape
    ids = torch.randint(0, vocab, (b, t), device=DEV)
    g = torch.randn(b, t, d, device=DEV).to(dtype)
    ref = embedding_norm_sq(ids, g, backend="torch") if HAS_GPU else embedding_norm_sq_ref(ids, g)
    _check_norm(embedding_norm_sq(ids, g, backend=backend), ref)
    flops = b * t * t * d  # upper triangle of the T × T Gram
    info = timed(lambda: embedding_norm_sq(ids, g, backend=backend), flops=flops)
    _attach(info, op="embedding_norm_sq", backend=backend, dtype=str(dtype), shape=list(shape),
            flops=flops)


def _sweep(launch, configs, flops, ceilings):
    import triton.testing
    best = None
    for cfg in configs:
        try:
            launch(cfg)
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=50, return_mode="median")
        except Exception:  # noqa: BLE001 - configs that do not fit (shared memory) are skipped
            continue
        if best is None or ms < best[1]:
            best = (cfg, ms)
    cfg, ms = best
    return {"best_config": dataclasses.asdict(cfg), "best_ms": ms,
            "best_tflops": flops / (ms * 1e-3) / 1e12, "bf16_tflops": ceilings.get("bf16_tflops")}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_config_sweep(timed, ceilings, dtype):
    """Best config per kernel at B=8, T=512, d=p=2048 (headline shape); results in extra_info."""
    from dpkern.kernels import bookkeeping as bk, ghost_norm as gn, instantiate_norm as inst
    b, t, d, p = HEADLINE
    a = torch.randn(b, t, d, device=DEV).to(dtype)
    g = torch.randn(b, t, p, device=DEV).to(dtype)
    scale = torch.rand(b, device=DEV)
    out = torch.empty(b, device=DEV)
    grad = torch.empty(p, d, device=DEV, dtype=dtype)
    res = {
        "ghost": _sweep(lambda c: gn.ghost_norm_fwd(a, [g], [out], c), gn.ghost_norm_search_space(),
                        b * linear_norm_flops(t, d, p, "ghost"), ceilings),
        "instantiate": _sweep(lambda c: inst.instantiate_norm_fwd(a, g, out, c),
                              inst.instantiate_norm_search_space(),
                              b * linear_norm_flops(t, d, p, "instantiate"), ceilings),
        "bookkeeping": _sweep(lambda c: bk.bookkeeping_fwd(a, g, scale, grad, False, c),
                              bk.bookkeeping_search_space(), 2 * b * t * d * p, ceilings),
    }
    info = timed(lambda: gn.ghost_norm_fwd(a, [g], [out]), flops=b * linear_norm_flops(t, d, p, "ghost"))
    _attach(info, op="config_sweep", dtype=str(dtype), shape=[b, t, d, p], sweep=res)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["tf32r", "tf32x3", "ieee"])
@pytest.mark.parametrize("op", ["ghost", "instantiate", "bookkeeping"])
def test_fp32_mode_bench(timed, op, mode):
    """fp32 inputs at the headline shape in each fp32 mode: what the sensitivity-exact TF32 mode
    ("tf32r", the GPU default) gains over tf32x3 / ieee. Checked against float64 of the operands
    as the mode sees them (TF32-rounded for tf32r) before timing."""
    from dpkern.ops._persample import operand
    b, t, d, p = HEADLINE
    a, g = torch.randn(b, t, d, device=DEV), torch.randn(b, t, p, device=DEV)
    a64, g64 = operand(a, mode, torch.float64), operand(g, mode, torch.float64)
    if op == "bookkeeping":
        scale = torch.rand(b, device=DEV)
        ref = bookkeeping_wgrad_ref(a64, g64, scale.double())
        out = bookkeeping_wgrad(a, g, scale, backend="triton", fp32_mode=mode)
        torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
        fn, flops = (lambda: bookkeeping_wgrad(a, g, scale, backend="triton", fp32_mode=mode),
                     2 * b * t * d * p)
    else:
        _check_norm(linear_norm_sq(a, g, method=op, backend="triton", fp32_mode=mode),
                    linear_norm_sq_ref(a64, g64))
        fn = lambda: linear_norm_sq(a, g, method=op, backend="triton", fp32_mode=mode)  # noqa: E731
        flops = b * linear_norm_flops(t, d, p, op)
    info = timed(fn, flops=flops)
    _attach(info, op=f"fp32_mode:{op}", fp32_mode=mode, shape=[b, t, d, p], flops=flops)
