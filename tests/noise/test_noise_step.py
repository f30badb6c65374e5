"""fused_noisy_step: every backend against the fp64 reference with the same z, sigma = 0 against
torch.optim, identical noise under sharding, refused input leaves everything untouched."""
import math

import pytest
import torch

import dpkern
from dpkern.noise import AdamWHyper, NoiseGenerator, SGDHyper, fused_noisy_step
from dpkern.noise.reference import noisy_update_ref, tensor_normals
from tests.conftest import HAS_GPU, kernel_devices

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


# Each fp32 operation of a kernel may be off by 2 ulps (approximate divide / sqrt, FMA contraction).
OP = 4 * 2.0**-24
BF16_ULP = 2.0**-7  # one bf16 ulp is at most 2**-7 of the value it rounds


def _backend_z(numels, offsets, device, backend, seed, n_steps):
    """The z the backend draws for steps 0 .. n_steps - 1: p = 0, g = 0, lr = 1, noise_std = 1 and
    B = 1 make the update write exactly -z into p."""
    gen = NoiseGenerator(secure=False, seed=seed)
    out = []
    for _ in range(n_steps):
        ps = [torch.zeros(n, device=device) for n in numels]
        gs = [torch.zeros(n, device=device) for n in numels]
        fused_noisy_step(ps, gs, hyper=SGDHyper(lr=1.0), noise_std=1.0, expected_batch_size=1.0,
                         noise=gen, global_offsets=offsets, backend=backend)
        out.append([(-p).double().cpu() for p in ps])
    return out


def _ref_steps(p, g, zs, m, v, hyper, noise_std=SIGMA_C, inv_b=1 / B, e_zs=None):
    """The fp64 reference (noisy_update_ref) over N steps on one tensor, on the backend's own z, and
    a first-order bound on how far an fp32 evaluation may be from it: each operation adds OP times
    the magnitude of its terms, and errors in p, m, v carry into the next step. p is rounded to its
    dtype after every step (a bf16 rounding may go the other way: one bf16 ulp more).
    e_zs: per step, a bound on |z_kernel - z| when zs are not the kernel's own (LMO-DP: zs from the
    float64 sampler). Returns (p, m, v, e_p, e_m, e_v) as flat fp64 tensors (m, v None where unused)."""
    sgd = isinstance(hyper, SGDHyper)
    p64 = p.double().cpu().flatten()
    gf = g.double().cpu().flatten()
    m64 = m.double().cpu().flatten() if m is not None else None
    v64 = v.double().cpu().flatten() if v is not None else None
    e_p, e_m, e_v = (torch.zeros_like(p64) for _ in range(3))
    lr, wd = hyper.lr, hyper.weight_decay
    hd = {k: getattr(hyper, k) for k in hyper.__dataclass_fields__}
    for t, z in enumerate(zs, start=1):
        hd.update(first=t == 1, step=t)
        new, m_new, v_new = noisy_update_ref(p64, gf, z.flatten(), m64, v64,
                                             optimizer="sgd" if sgd else "adamw", hyper=hd,
                                             noise_std=noise_std, inv_b=inv_b,
                                             compute_dtype=torch.float64)
        sz = noise_std * z.flatten()
        gn = (gf + sz) * inv_b
        e_gn = 3 * OP * (gf.abs() + sz.abs()) * inv_b
        if e_zs is not None:
            e_gn = e_gn + noise_std * e_zs[t - 1].flatten() * inv_b
        if sgd:
            d = gn + wd * p64
            e_d = e_gn + wd * e_p + 2 * OP * (gn.abs() + wd * p64.abs())
            if hyper.momentum != 0:
                mu, damp = hyper.momentum, hyper.dampening
                if t == 1:
                    e_m = e_d.clone()
                else:
                    e_m = mu * e_m + (1 - damp) * e_d + 3 * OP * (mu * m64.abs() + (1 - damp) * d.abs())
                e_m = e_m + OP * m_new.abs()  # stored as fp32
                if hyper.nesterov:
                    e_d = e_d + mu * e_m + 2 * OP * (d.abs() + mu * m_new.abs())
                    d = d + mu * m_new
                else:
                    d, e_d = m_new, e_m
            e_p = e_p + lr * e_d + 2 * OP * (p64.abs() + lr * d.abs())
        else:
            b1, b2, eps = hyper.beta1, hyper.beta2, hyper.eps
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            pw = p64 * (1 - lr * wd)
            e_pw = (1 - lr * wd) * e_p + 2 * OP * p64.abs()
            e_m = b1 * e_m + (1 - b1) * e_gn + 3 * OP * (b1 * m64.abs() + (1 - b1) * gn.abs())
            e_m = e_m + OP * m_new.abs()
            e_v = b2 * e_v + (1 - b2) * 2 * gn.abs() * e_gn + 4 * OP * (b2 * v64 + (1 - b2) * gn * gn)
            e_v = e_v + OP * v_new
            root = torch.sqrt(v_new)
            s = root / math.sqrt(bc2)
            e_root = torch.minimum(e_v / (2 * root).clamp_min(1e-300), torch.sqrt(e_v))
            e_s = e_root / math.sqrt(bc2) + 3 * OP * s
            den = s + eps
            e_den = e_s + OP * den
            u = (lr / bc1) * m_new / den
            e_u = (lr / bc1) * (e_m / den + m_new.abs() * e_den / den**2) + 3 * OP * u.abs()
            e_p = e_pw + e_u + OP * (pw.abs() + u.abs())
        m64 = m_new if m_new is not None else m64
        v64 = v_new if v_new is not None else v64
        p64 = new.to(p.dtype).double()
        if p.dtype == torch.bfloat16:
            e_p = e_p + BF16_ULP * (new.abs() + e_p)
        else:
            e_p = e_p + OP * new.abs()
    return p64, m64, v64, e_p, e_m, e_v


def _assert_within(name, got, ref, bound):
    """|got - ref| <= 2 * bound elementwise (2: room for second-order terms); reports the worst."""
    got = got.double().cpu().flatten()
    ratio = (got - ref).abs() / (2 * bound + 1e-30)
    worst = int(ratio.argmax()) if ratio.numel() else 0
    assert not torch.isnan(got).any(), f"{name}: NaN in the output"
    assert ratio.numel() == 0 or ratio[worst] <= 1.0, (
        f"{name}[{worst}]: got {got[worst].item()!r}, reference {ref[worst].item()!r}, "
        f"allowed {2 * bound[worst].item():.3g} ({ratio[worst].item():.3g} times over)")


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"p{str(d[0])[6:]}-g{str(d[1])[6:]}")
@pytest.mark.parametrize("opt", list(HYPERS))
@pytest.mark.parametrize("backend", _backends())
def test_matches_reference_over_steps(backend, opt, dtypes):
    """Every backend against the fp64 update on the backend's own z (the z itself is checked
    against the reference draw below and in test_same_z_under_sharding), within a forward error
    bound of fp32 arithmetic. The bound is elementwise: AdamW divides by sqrt(v), which amplifies
    fp32 rounding wherever v is small, and a 1M-element tensor has such elements."""
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
    zs = _backend_z([p.numel() for p in ps], offsets, device, backend, 7, N_STEPS)
    words = [NoiseGenerator(secure=False, seed=7).kernel_words(s) for s in range(N_STEPS)]
    for s in range(N_STEPS):
        ref_z = tensor_normals(sum(sizes), 0, words[s]).double()
        torch.testing.assert_close(torch.cat(zs[s]), ref_z, rtol=2e-6, atol=2e-6)
    refs = [_ref_steps(p, g, [z[i] for z in zs], ms[i] if ms else None, vs[i] if vs else None, hyper)
            for i, (p, g) in enumerate(zip(ps, gs))]
    gen = NoiseGenerator(secure=False, seed=7)
    for t in range(1, N_STEPS + 1):
        used = fused_noisy_step(ps, gs, ms, vs, hyper=hyper, noise_std=SIGMA_C,
                                expected_batch_size=B, noise=gen, t=t, backend=backend)
        assert used == t - 1
    for i, (p64, m64, v64, e_p, e_m, e_v) in enumerate(refs):
        _assert_within(f"p{i}", ps[i], p64, e_p)
        if m64 is not None:
            _assert_within(f"m{i}", ms[i], m64, e_m)
        if v64 is not None:
            _assert_within(f"v{i}", vs[i], v64, e_v)


@pytest.mark.parametrize("opt", list(HYPERS))
@pytest.mark.parametrize("backend", _backends())
def test_sigma_zero_equals_torch_optim(backend, opt):
    """noise_std = 0 still runs the fused update, and it is torch.optim's update on g / B. New
    gradient tensors every step (allocated while the old ones live, so at new addresses): on CUDA
    this runs the in-place refresh of the descriptor tables' gradient pointers, both buffers."""
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
