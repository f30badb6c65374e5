"""fused_noisy_step: every backend against the fp64 reference with the same z, sigma = 0 against
torch.optim, identical noise under sharding, refused input leaves everything untouched."""
import pytest
import torch

import dpkern
from dpkern.noise import AdamWHyper, NoiseGenerator, SGDHyper, fused_noisy_step
from dpkern.noise.reference import noisy_update_ref, tensor_normals
from tests.conftest import HAS_GPU, kernel_devices
from tests.tolerance import OUTPUT_EPS

HYPERS = {
    "sgd": SGDHyper(lr=0.1),
    "sgd_wd": SGDHyper(lr=0.1, weight_decay=0.05),
    "sgd_momentum": SGDHyper(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd_nesterov": SGDHyper(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adamw": AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1),
}
# (param dtype, grad dtype)
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
          (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
# Offsets 0, 1000, 1005, 1068, 5165: aligned and misaligned tensors, tails, a 1-element tensor.
SIZES = [1000, 5, 63, 4097, 1]
GPU_SIZES = SIZES + [1 << 20, 3 * (1 << 18) + 7]
N_STEPS = 3
SIGMA_C, B = 2.0, 8.0


def _backends():
    return ["torch", "triton"] + (["cuda"] if dpkern.cuda_available() else [])


def _state(hyper, ps):
    needs_m = isinstance(hyper, AdamWHyper) or hyper.momentum != 0
    ms = [torch.randn(p.shape, device=p.device).abs() * 0.1 for p in ps] if needs_m else None
    vs = [torch.rand(p.shape, device=p.device) * 0.01 for p in ps] \
        if isinstance(hyper, AdamWHyper) else None
    return ms, vs


def _ref_steps(ps, gs, ms, vs, hyper, words_per_step, offsets):
    """fp64 reference with the torch-reference z, rounding params to their dtype after each step."""
    out = []
    for i, (p, g) in enumerate(zip(ps, gs)):
        p64 = p.double().cpu()
        m64 = ms[i].double().cpu() if ms is not None else None
        v64 = vs[i].double().cpu() if vs is not None else None
        for t, words in enumerate(words_per_step, start=1):
            z = tensor_normals(p.numel(), offsets[i], words).view(p.shape)
            hd = {k: getattr(hyper, k) for k in hyper.__dataclass_fields__}
            hd.update(first=t == 1, step=t)
            opt = "adamw" if isinstance(hyper, AdamWHyper) else "sgd"
            p64, m_new, v_new = noisy_update_ref(p64, g.cpu(), z, m64, v64, optimizer=opt,
                                                 hyper=hd, noise_std=SIGMA_C, inv_b=1 / B,
                                                 compute_dtype=torch.float64)
            p64 = p64.to(p.dtype).double()
            m64 = m_new if m_new is not None else m64
            v64 = v_new if v_new is not None else v64
        out.append((p64, m64, v64))
    return out


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"p{str(d[0])[6:]}-g{str(d[1])[6:]}")
@pytest.mark.parametrize("opt", list(HYPERS))
@pytest.mark.parametrize("backend", _backends())
def test_matches_reference_over_steps(backend, opt, dtypes):
    device = "cuda" if backend == "cuda" else kernel_devices()[0]
    pdt, gdt = dtypes
    hyper = HYPERS[opt]
    torch.manual_seed(0)
    sizes = GPU_SIZES if HAS_GPU else SIZES
    ps = [torch.randn(n, device=device).to(pdt) for n in sizes]
    ps[1] = ps[1].view(1, 5)  # shapes other than 1-D
    gs = [torch.randn(p.shape, device=device).to(gdt) * 3 for p in ps]
    ms, vs = _state(hyper, ps)
    offsets = [0]
    for p in ps[:-1]:
        offsets.append(offsets[-1] + p.numel())
    gen = NoiseGenerator(secure=False, seed=7)
    ref_gen = NoiseGenerator(secure=False, seed=7)
    words = [ref_gen.kernel_words(s) for s in range(N_STEPS)]
    ref = _ref_steps(ps, gs, [m.clone() for m in ms] if ms else None,
                     [v.clone() for v in vs] if vs else None, hyper, words, offsets)
    for t in range(1, N_STEPS + 1):
        used = fused_noisy_step(ps, gs, ms, vs, hyper=hyper, noise_std=SIGMA_C,
                                expected_batch_size=B, noise=gen, t=t, backend=backend)
        assert used == t - 1
    # fp32: a few ulps per step; bf16 params: one bf16 ulp (a rounding tie may go either way).
    p_rtol = OUTPUT_EPS[pdt] if pdt == torch.bfloat16 else 8 * N_STEPS * OUTPUT_EPS[torch.float32]
    s_atol = 1e-4 if pdt == torch.bfloat16 else 1e-6
    for i, (p64, m64, v64) in enumerate(ref):
        torch.testing.assert_close(ps[i].double().cpu(), p64, rtol=p_rtol, atol=1e-6)
        if m64 is not None:
            torch.testing.assert_close(ms[i].double().cpu(), m64, rtol=1e-5, atol=s_atol)
        if v64 is not None:
            torch.testing.assert_close(vs[i].double().cpu(), v64, rtol=1e-5, atol=s_atol)


@pytest.mark.parametrize("opt", list(HYPERS))
@pytest.mark.parametrize("backend", _backends())
def test_sigma_zero_equals_torch_optim(backend, opt):
    """noise_std = 0 still runs the fused update, and it is torch.optim's update on g / B."""
    device = "cuda" if backend == "cuda" else kernel_devices()[0]
    hyper = HYPERS[opt]
    torch.manual_seed(1)
    ps = [torch.randn(n, device=device) for n in (300, 17)]
    ref = [p.clone().requires_grad_(True) for p in ps]
    if isinstance(hyper, AdamWHyper):
        topt = torch.optim.AdamW(ref, lr=hyper.lr, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps,
                                 weight_decay=hyper.weight_decay, foreach=False)
    else:
        topt = torch.optim.SGD(ref, lr=hyper.lr, momentum=hyper.momentum, dampening=hyper.dampening,
                               nesterov=hyper.nesterov, weight_decay=hyper.weight_decay, foreach=False)
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    gen = NoiseGenerator(secure=False, seed=0)
    for t in range(1, 4):
        gs = [torch.randn_like(p) * B for p in ps]
        for r, g in zip(ref, gs):
            r.grad = g / B
        topt.step()
        fused_noisy_step(ps, gs, ms, vs, hyper=hyper, noise_std=0.0, expected_batch_size=B,
                         noise=gen, t=t, backend=backend)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-6)


def _z_via_sgd(numels, offsets, device, backend, seed=3):
    """p = 0, g = 0, lr = 1, noise_std = 1, B = 1: the update writes exactly -z into p."""
    ps = [torch.zeros(n, device=device) for n in numels]
    gs = [torch.zeros(n, device=device) for n in numels]
    fused_noisy_step(ps, gs, hyper=SGDHyper(lr=1.0), noise_std=1.0, expected_batch_size=1.0,
                     noise=NoiseGenerator(secure=False, seed=seed), global_offsets=offsets,
                     backend=backend)
    return [-p for p in ps]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", _backends())
def test_same_z_under_sharding(backend, world):
    device = "cuda" if backend == "cuda" else kernel_devices()[0]
    numels = [1000, 4097, 63] if not HAS_GPU else [1000, 4097, 63, (1 << 20) + 3]
    offsets = [0, 1000, 5097]
    if HAS_GPU:
        offsets.append(5160)
    full = _z_via_sgd(numels, offsets, device, backend)
    # Each rank holds a contiguous slice of every tensor, at its own global offset (FSDP-like).
    for rank in range(world):
        shard_numels, shard_offsets, pieces = [], [], []
        for n, o, z in zip(numels, offsets, full):
            lo, hi = rank * n // world, (rank + 1) * n // world
            shard_numels.append(hi - lo)
            shard_offsets.append(o + lo)
            pieces.append(z[lo:hi])
        got = _z_via_sgd(shard_numels, shard_offsets, device, backend)
        for a, b in zip(got, pieces):
            assert torch.equal(a, b)
    ref = tensor_normals(sum(numels), 0, NoiseGenerator(secure=False, seed=3).kernel_words(0))
    torch.testing.assert_close(torch.cat(full).cpu(), ref, rtol=2e-6, atol=2e-6)


def test_different_tensors_get_different_noise():
    z = _z_via_sgd([4096, 4096], None, kernel_devices()[0], "torch")
    assert not torch.equal(z[0], z[1])
    assert abs(torch.corrcoef(torch.stack(z))[0, 1].item()) < 0.07  # 4096 pairs: sd 0.016


def _bad_cases():
    p = lambda *s: torch.randn(*s)  # noqa: E731
    A = AdamWHyper(lr=1e-3)
    return {
        "empty_params": (dict(params=[], grads=[]), ValueError, "non-empty"),
        "grads_len": (dict(params=[p(4), p(3)], grads=[p(4)]), ValueError, "grads must be a list of 2"),
        "grads_shape": (dict(params=[p(4), p(3)], grads=[p(4), p(4)]), ValueError, r"grads\[1\] has shape"),
        "param_int": (dict(params=[torch.ones(4, dtype=torch.int32)], grads=[p(4)]), TypeError,
                      r"params\[0\] must be float32 or bfloat16"),
        "grad_fp16": (dict(params=[p(4)], grads=[p(4).half()]), TypeError, r"grads\[0\] must be"),
        "param_noncontig": (dict(params=[p(4, 4).t()], grads=[p(4, 4)]), ValueError,
                            r"params\[0\] must be contiguous"),
        "grad_noncontig": (dict(params=[p(4, 4)], grads=[p(4, 4).t()]), ValueError,
                           r"grads\[0\] must be contiguous"),
        "grad_device": (dict(params=[p(4)], grads=[torch.empty(4, device="meta")]), ValueError,
                        r"grads\[0\] is on meta"),
        "states_missing": (dict(params=[p(4)], grads=[p(4)], hyper=A), ValueError, "exp_avgs"),
        "state_bf16": (dict(params=[p(4)], grads=[p(4)], exp_avgs=[p(4).bfloat16()],
                            exp_avg_sqs=[p(4)], hyper=A), TypeError, r"exp_avgs\[0\] must be"),
        "overlap": (dict(params=[p(4), p(4)], grads=[p(4), p(4)], global_offsets=[0, 2]), ValueError,
                    "overlap"),
        "neg_offset": (dict(params=[p(4)], grads=[p(4)], global_offsets=[-1]), ValueError,
                       "global_offsets"),
        "noise_std_nan": (dict(params=[p(4)], grads=[p(4)], noise_std=float("nan")), ValueError,
                          "noise_std"),
        "noise_std_neg": (dict(params=[p(4)], grads=[p(4)], noise_std=-1.0), ValueError, "noise_std"),
        "batch_zero": (dict(params=[p(4)], grads=[p(4)], expected_batch_size=0), ValueError,
                       "expected_batch_size"),
        "hyper_type": (dict(params=[p(4)], grads=[p(4)], hyper={"lr": 1}), TypeError, "hyper must be"),
        "lr_nan": (dict(params=[p(4)], grads=[p(4)], hyper=SGDHyper(lr=float("nan"))), ValueError,
                   "hyper.lr"),
        "t_zero": (dict(params=[p(4)], grads=[p(4)], t=0), ValueError, "t "),
        "cuda_on_cpu": (dict(params=[p(4)], grads=[p(4)], backend="cuda"), (RuntimeError, ValueError),
                        "cuda"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_refused_and_nothing_written(case):
    if case == "cuda_on_cpu" and HAS_GPU and not dpkern.cuda_available():
        pytest.skip("needs the extension to reach the device check")
    kwargs, err, match = _bad_cases()[case]
    args = dict(hyper=SGDHyper(lr=0.1), noise_std=1.0, expected_batch_size=4.0, backend="torch")
    args.update(kwargs)
    gen = NoiseGenerator(secure=False, seed=0)
    before = [x.clone() for x in args["params"] if x.device.type != "meta"]
    with pytest.raises(err, match=match):
        fused_noisy_step(noise=gen, **args)
    for x, b in zip(args["params"], before):
        assert torch.equal(x, b)
    assert gen.step == 0  # no counter step was consumed


@pytest.mark.gpu
def test_cuda_refuses_cpu_tensors_and_mixed_devices():
    if not dpkern.cuda_available():
        pytest.skip("CUDA extension not built")
    gen = NoiseGenerator(secure=False, seed=0)
    p = torch.randn(8)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fused_noisy_step([p], [torch.randn(8)], hyper=SGDHyper(lr=0.1), noise_std=1.0,
                         expected_batch_size=2, noise=gen, backend="cuda")
    pc = torch.randn(8, device="cuda")
    before = pc.clone()
    with pytest.raises(ValueError, match=r"grads\[0\] is on cpu"):
        fused_noisy_step([pc], [torch.randn(8)], hyper=SGDHyper(lr=0.1), noise_std=1.0,
                         expected_batch_size=2, noise=gen, backend="cuda")
    assert torch.equal(pc, before) and gen.step == 0
