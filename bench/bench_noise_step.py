"""Fused noise + optimizer step on a 1B-parameter set: bytes/param over kernel time vs copy bandwidth,
and the ratio to the unfused torch baseline (randn_like + add + torch.optim.AdamW(fused=True));
the same step with LMO-DP noise (each Gamma path) next to the Gaussian one; the noisy release pass
(fused_noisy_release_, GPU only) alone and followed by the noise-free update."""
import pytest
import torch

import dpkern
from bench import registry
from bench.conftest import HAS_GPU
from dpkern.mechanisms import LMOMechanism, LMOParams
from dpkern.mechanisms import lmo_ref as R
from dpkern.noise import (AdamWHyper, NoiseGenerator, SGDHyper, fused_noisy_release_,
                          fused_noisy_step)


# A 1.0B-parameter decoder (d=2048, ffn=5632, 17 layers, vocab 32000, untied head): 156 tensors.
SHAPES = list(registry.shapes("noise_step")[0])
HYPERS = {"sgd": SGDHyper(lr=1e-3), "sgd_momentum": SGDHyper(lr=1e-3, momentum=0.9),
          "adamw": AdamWHyper(lr=1e-4)}
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16)}
SIGMA_C, B = 1.0, 1024.0
_BASELINE_MS: dict = {}  # dtype -> unfused AdamW median ms, measured first in the same run


def bytes_per_param(opt: str, pdt, gdt) -> int:
    """Bytes that must move per element: p read + written, g read, fp32 states read + written."""
    ps, gs = torch.finfo(pdt).bits // 8, torch.finfo(gdt).bits // 8
    states = {"sgd": 0, "sgd_momentum": 1, "adamw": 2}[opt]
    return 2 * ps + gs + 8 * states


def _backends():
    if not HAS_GPU:
        return ["torch"]
    return ["triton"] + (["cuda"] if dpkern.cuda_available() else [])


def _tensors(pdt, gdt, opt, dev):
    torch.manual_seed(0)
    ps = [(torch.randn(s, device=dev) * 0.02).to(pdt) for s in SHAPES]
    gs = [torch.randn(s, device=dev).to(gdt) for s in SHAPES]
    ms = [torch.zeros(s, device=dev) for s in SHAPES] if opt != "sgd" else None
    vs = [torch.zeros(s, device=dev) for s in SHAPES] if opt == "adamw" else None
    return ps, gs, ms, vs


def _check_against_torch(backend, opt, pdt, gdt, dev, step_kw=None):
    """A few real-shaped small tensors: the backend must match the torch reference before timing.
    step_kw: the noise arguments of fused_noisy_step (default: Gaussian, noise_std=SIGMA_C)."""
    shapes = [(2048,), (257, 33), (1000,)]
    out = []
    for be in (backend, "torch"):
        torch.manual_seed(1)
        ps = [torch.randn(s, device=dev).to(pdt) for s in shapes]
        gs = [torch.randn(s, device=dev).to(gdt) for s in shapes]
        ms = [torch.zeros(s, device=dev) for s in shapes]
        vs = [torch.zeros(s, device=dev) for s in shapes]
        fused_noisy_step(ps, gs, ms, vs, hyper=HYPERS[opt], expected_batch_size=B,
                         noise=NoiseGenerator(secure=False, seed=0), backend=be,
                         **(step_kw or dict(noise_std=SIGMA_C)))
        out.append(ps)
    for a, b in zip(*out):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if pdt == torch.bfloat16 else 1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_noise_step_unfused_baseline(timed, dtype):
    """randn_like + add (+ scale) per tensor, then torch.optim.AdamW(fused=True) (or foreach on CPU)."""
    dev = "cuda" if HAS_GPU else "cpu"
    pdt, gdt = DTYPES[dtype]
    torch.manual_seed(0)
    ps = [(torch.randn(s, device=dev) * 0.02).to(pdt) for s in SHAPES]
    gs = [torch.randn(s, device=dev).to(gdt) for s in SHAPES]
    h = HYPERS["adamw"]
    opt = torch.optim.AdamW(ps, lr=h.lr, betas=(h.beta1, h.beta2), eps=h.eps,
                            weight_decay=h.weight_decay, fused=HAS_GPU)

    def step():
        for p, g in zip(ps, gs):
            p.grad = torch.add(g, torch.randn_like(g), alpha=SIGMA_C).mul_(1.0 / B)
        opt.step()

    n = sum(p.numel() for p in ps)
    info = timed(step, bytes_moved=bytes_per_param("adamw", pdt, gdt) * n, baseline=True)
    if "median_ms" in info:
        _BASELINE_MS[dtype] = info["median_ms"]
    info.update(op="noise_step", backend="torch_unfused_adamw", optimizer="adamw", dtype=dtype,
                n_params=n, n_tensors=len(ps), bytes_per_param=bytes_per_param("adamw", pdt, gdt))
    del ps, gs, opt
    if HAS_GPU:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("opt", list(HYPERS))
def test_noise_step_bench(timed, opt, dtype, backend):
    dev = "cuda" if HAS_GPU else "cpu"
    pdt, gdt = DTYPES[dtype]
    _check_against_torch(backend, opt, pdt, gdt, dev)  # a wrong kernel is never reported
    ps, gs, ms, vs = _tensors(pdt, gdt, opt, dev)
    gen = NoiseGenerator(secure=False, seed=0)
    n = sum(p.numel() for p in ps)

    def step():
        fused_noisy_step(ps, gs, ms, vs, hyper=HYPERS[opt], noise_std=SIGMA_C,
                         expected_batch_size=B, noise=gen, t=1, backend=backend)

    bpp = bytes_per_param(opt, pdt, gdt)
    info = timed(step, bytes_moved=bpp * n)
    info.update(op="noise_step", backend=backend, optimizer=opt, dtype=dtype, n_params=n,
                n_tensors=len(ps), bytes_per_param=bpp)
    if opt == "adamw" and dtype in _BASELINE_MS and "median_ms" in info:
        info["speedup_vs_unfused_adamw"] = _BASELINE_MS[dtype] / info["median_ms"]
    del ps, gs, ms, vs
    if HAS_GPU:
        torch.cuda.empty_cache()


# ---- LMO-DP noise in the same fused step (issue 9) -------------------------------------------
# Each Gamma path of the sampler (Philox calls per coordinate: k1 1, k2 / k05 2, mt 5) next to the
# fused Gaussian step, AdamW on the same tensor set; "gaussian" runs first in each (dtype, backend),
# so every LMO case also reports its time over the Gaussian one's.
LMO_CASES = {"k1": LMOParams(k=1.0), "k2": LMOParams(k=2.0), "k05": LMOParams(k=0.5),
             "mt": LMOParams(k=3.7)}
_GAUSSIAN_MS: dict = {}  # (dtype, backend) -> fused Gaussian AdamW median ms


def _mech_kwargs(mech: str) -> dict:
    if mech == "gaussian":
        return dict(noise_std=SIGMA_C)
    return dict(mechanism=LMOMechanism(LMO_CASES[mech], clip_norm=SIGMA_C, accounting="certified"))


@pytest.mark.parametrize("mech", ["gaussian"] + list(LMO_CASES))
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_noise_step_lmo_bench(timed, dtype, backend, mech):
    """Fused LMO-DP noise + AdamW vs fused Gaussian noise + AdamW: GB/s of the bytes the update
    must move (the noise itself is drawn in registers and moves none)."""
    dev = "cuda" if HAS_GPU else "cpu"
    pdt, gdt = DTYPES[dtype]
    # a wrong kernel is never reported: the fused step with lmo_ref noise on the torch backend
    _check_against_torch(backend, "adamw", pdt, gdt, dev, _mech_kwargs(mech))
    ps, gs, ms, vs = _tensors(pdt, gdt, "adamw", dev)
    gen = NoiseGenerator(secure=False, seed=0)
    n = sum(p.numel() for p in ps)
    kw = _mech_kwargs(mech)

    def step():
        fused_noisy_step(ps, gs, ms, vs, hyper=HYPERS["adamw"], expected_batch_size=B, noise=gen,
                         t=1, backend=backend, **kw)

    bpp = bytes_per_param("adamw", pdt, gdt)
    info = timed(step, bytes_moved=bpp * n)
    info.update(op="noise_step_lmo", backend=backend, optimizer="adamw", dtype=dtype,
                mechanism=mech, n_params=n, n_tensors=len(ps), bytes_per_param=bpp,
                philox_calls_per_coord=0.25 if mech == "gaussian" else R.lmo_blocks(LMO_CASES[mech]))
    if "median_ms" in info:
        if mech == "gaussian":
            _GAUSSIAN_MS[(dtype, backend)] = info["median_ms"]
        elif (dtype, backend) in _GAUSSIAN_MS:
            info["time_over_gaussian"] = info["median_ms"] / _GAUSSIAN_MS[(dtype, backend)]
    del ps, gs, ms, vs
    if HAS_GPU:
        torch.cuda.empty_cache()


# ---- the noisy release pass (DPOptimizer with grad_postprocessors, issue 8) ---------------------
# fused_noisy_release_ writes (g + σC z) / B into the fp32 gradient sums (the engine's accumulators;
# 8 bytes per parameter: read + write), the post-processors run on them, then a noise-free fused
# update reads them back. GPU only: at the 1B size, next to the one-pass fused step with the same
# fp32 gradients, so each (dtype, backend) reports what materialising the noisy gradient costs.
_ONE_PASS_FP32G_MS: dict = {}  # (dtype, backend) -> one-pass AdamW median ms, fp32 gradients


def _gpu_only():
    if not HAS_GPU:
        pytest.skip("GPU only: the release pass at the 1B-parameter size")


def _check_release(backend, dev, kw, pdt):
    """Before timing, on a few small tensors: the release matches the torch backend, and release +
    noise-free update gives the one-pass step's parameters bit for bit (its promise)."""
    shapes = [(2048,), (257, 33), (1000,)]
    out = []
    for be in (backend, "torch"):
        torch.manual_seed(1)
        gs = [torch.randn(s, device=dev) for s in shapes]
        fused_noisy_release_(gs, expected_batch_size=B, noise=NoiseGenerator(secure=False, seed=0),
                             backend=be, **kw)
        out.append(gs)
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)  # LMO z: 64 ulps + 1e-5 (/ B)
    runs = []
    for two_pass in (False, True):
        torch.manual_seed(2)
        ps = [torch.randn(s, device=dev).to(pdt) for s in shapes]
        gs = [torch.randn(s, device=dev) for s in shapes]
        ms = [torch.zeros(s, device=dev) for s in shapes]
        vs = [torch.zeros(s, device=dev) for s in shapes]
        gen = NoiseGenerator(secure=False, seed=0)
        step = dict(hyper=HYPERS["adamw"], noise=gen, t=1, backend=backend)
        if two_pass:
            k = fused_noisy_release_(gs, expected_batch_size=B, noise=gen, backend=backend, **kw)
            fused_noisy_step(ps, gs, ms, vs, noise_std=0.0, expected_batch_size=1, counter_step=k,
                             **step)
        else:
            fused_noisy_step(ps, gs, ms, vs, expected_batch_size=B, **step, **kw)
        runs.append(ps + ms + vs)
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "release + update != one-pass step"


@pytest.mark.parametrize("mech", ["gaussian", "k1"])
@pytest.mark.parametrize("backend", _backends())
def test_noise_release_bench(timed, backend, mech):
    """The release pass alone over the 1B set's fp32 gradient sums (one launch on CUDA)."""
    _gpu_only()
    kw = _mech_kwargs(mech)
    _check_release(backend, "cuda", kw, torch.float32)
    torch.manual_seed(0)
    gs = [torch.randn(s, device="cuda") for s in SHAPES]
    gen = NoiseGenerator(secure=False, seed=0)
    n = sum(g.numel() for g in gs)

    def step():
        fused_noisy_release_(gs, expected_batch_size=B, noise=gen, backend=backend, **kw)

    info = timed(step, bytes_moved=8 * n)
    info.update(op="noise_release", backend=backend, dtype="fp32", mechanism=mech, n_params=n,
                n_tensors=len(gs), bytes_per_param=8)
    del gs
    torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", ["one_pass", "release_update"])
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_noise_release_update_bench(timed, dtype, backend, mode):
    """AdamW on fp32 gradient sums (params fp32 or bf16), as DPOptimizer runs it: "one_pass" (no
    post-processors) vs "release_update" (release + noise-free update, the post-processors left
    out); the latter reports time_over_one_pass."""
    _gpu_only()
    pdt = DTYPES[dtype][0]
    _check_release(backend, "cuda", _mech_kwargs("gaussian"), pdt)
    ps, _, ms, vs = _tensors(pdt, torch.float32, "adamw", "cuda")
    gs = [torch.randn(s, device="cuda") for s in SHAPES]
    gen = NoiseGenerator(secure=False, seed=0)
    n = sum(p.numel() for p in ps)
    kw = dict(hyper=HYPERS["adamw"], noise=gen, t=1, backend=backend)

    def one_pass():
        fused_noisy_step(ps, gs, ms, vs, noise_std=SIGMA_C, expected_batch_size=B, **kw)

    def release_update():
        k = fused_noisy_release_(gs, noise_std=SIGMA_C, expected_batch_size=B, noise=gen,
                                 backend=backend)
        fused_noisy_step(ps, gs, ms, vs, noise_std=0.0, expected_batch_size=1, counter_step=k, **kw)

    bpp = bytes_per_param("adamw", pdt, torch.float32) + (8 if mode == "release_update" else 0)
    info = timed(one_pass if mode == "one_pass" else release_update, bytes_moved=bpp * n)
    info.update(op="noise_release_update", backend=backend, optimizer="adamw", dtype=dtype,
                grad_dtype="fp32", mode=mode, n_params=n, n_tensors=len(ps), bytes_per_param=bpp)
    if "median_ms" in info:
        if mode == "one_pass":
            _ONE_PASS_FP32G_MS[(dtype, backend)] = info["median_ms"]
        elif (dtype, backend) in _ONE_PASS_FP32G_MS:
            info["time_over_one_pass"] = info["median_ms"] / _ONE_PASS_FP32G_MS[(dtype, backend)]
    del ps, gs, ms, vs
    torch.cuda.empty_cache()
