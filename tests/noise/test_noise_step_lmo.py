"""fused_noisy_step(mechanism=LMOMechanism): LMO-DP noise drawn inside the fused noise + update step.

Every backend against a float64 reference built from dpkern.mechanisms.lmo_ref (its z on the
stream-1 counters, then the fp64 optimizer update), SGD with momentum and AdamW, fp32 and bf16
parameters, several steps, every Gamma path, awkward sizes and offsets; the checker is shown to
catch a wrong stream, offset or scale; the engine's fused step equals its unfused step; refused
input changes nothing."""
import pytest
import torch
from torch import nn

import dpkern
from dpkern import PrivacyEngine
from dpkern.mechanisms import LMOMechanism, LMOParams, GaussianMechanism
from dpkern.mechanisms import lmo_ref as R
from dpkern.mechanisms import noise_ops as N
from dpkern.noise import AdamWHyper, NoiseGenerator, SGDHyper, fused_noisy_step
from tests.conftest import HAS_GPU, kernel_devices
from tests.noise.test_noise_step import _assert_within, _ref_steps
from tests.tolerance import OUTPUT_EPS

# One configuration per Gamma path (as tests/mechanisms/test_lmo_sampler.py): k = 1, 2, 0.5 closed
# forms; Marsaglia-Tsang for k > 1 and, with the U^(1/k) boost, k < 1.
PARAMS = {
    "k1": LMOParams(),
    "k2": LMOParams(a1=0.5, a3=0.2, a4=0.3, theta=0.8, k=2.0, lam=2.0, a=0.0, b=1.0),
    "k05": LMOParams(a1=0.9, a3=0.1, a4=0.1, theta=2.0, k=0.5, lam=1.0, a=1.0, b=3.0),
    "mt": LMOParams(a1=0.4, a3=0.1, a4=0.2, theta=0.5, k=3.7, lam=10.0, a=0.5, b=1.0),
    "mt_boost": LMOParams(a1=0.7, a3=0.3, a4=0.1, theta=1.0, k=0.3, lam=0.5, a=0.0, b=2.0),
}
HYPERS = {
    "sgd_momentum": SGDHyper(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "adamw": AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1),
}
# (param dtype, grad dtype): fp32; bf16 weights with the engine's fp32 gradient sums; all bf16.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
          (torch.bfloat16, torch.bfloat16)]
# numel 1, 7, 63 at offsets that are not multiples of 8 (the kernels' scalar paths and tails), then
# tensors at 8-aligned offsets (CUDA's 16-byte vector path); on a GPU, also several 8192-element
# chunks of the CUDA kernel, aligned and not.
SIZES = [(1, 3), (7, 5), (63, 13), (1000, 81), (130, 1088), (2053, 1224)]
GPU_SIZES = SIZES + [(3 * 8192 + 5, 3281), (16384, 28000)]
N_STEPS = 3
C, B, SEED = 0.7, 8.0, 11

# z tolerance (kernel fp32 vs lmo_ref float64): z = Laplace / u goes through a few fp32 roundings
# in log / cos / exp and two divisions, each a few ulps relative (the uniforms are exact), so a
# relative bound of 64 fp32 ulps; Triton's log on the GPU lowers to lg2.approx (absolute error
# ~2^-22), hence an absolute term too. The same policy as the sampler's own tests. The update's
# tolerance is tests/noise/test_noise_step.py's first-order fp32 bound fed with this z error, plus
# one bf16 ulp per step for bf16 weights (a rounding may go either way); it is dtype-aware there.
Z_RTOL = 64 * OUTPUT_EPS[torch.float32]
Z_ATOL = 1e-5


def _backends():
    return ["torch", "triton"] + (["cuda"] if dpkern.cuda_available() else [])


def _device(backend):
    return "cuda" if backend == "cuda" else kernel_devices()[0]


def _mech(name, clip=C):
    return LMOMechanism(PARAMS[name], clip_norm=clip, accounting="certified")


def _sizes():
    return GPU_SIZES if HAS_GPU else SIZES


def _ref_z(name, sizes, step, device="cpu", seed=SEED):
    """float64 z of clip norm 1 per tensor: lmo_ref on the stream-1 words of counter step `step`."""
    words = NoiseGenerator(secure=False, seed=seed).kernel_words(step, stream=R.STREAM_LMO)
    return [R.lmo_noise_ref(n, PARAMS[name], words=words, offset=o, device=device).cpu()
            for n, o in sizes]


_Z_CACHE: dict = {}


def _backend_z(backend, name, sizes, n_steps=N_STEPS, seed=SEED):
    """The z the backend adds at counter steps 0 .. n_steps - 1: p = 0, g = 0, lr = 1, clip norm 1
    and B = 1 make the fused SGD step write exactly -z into p."""
    key = (backend, name, tuple(sizes), n_steps, seed)
    if key not in _Z_CACHE:
        dev = _device(backend)
        gen = NoiseGenerator(secure=False, seed=seed)
        out = []
        for _ in range(n_steps):
            ps = [torch.zeros(n, device=dev) for n, _ in sizes]
            gs = [torch.zeros(n, device=dev) for n, _ in sizes]
            fused_noisy_step(ps, gs, hyper=SGDHyper(lr=1.0), expected_batch_size=1.0, noise=gen,
                             global_offsets=[o for _, o in sizes], mechanism=_mech(name, 1.0),
                             backend=backend)
            out.append([(-p).double().cpu() for p in ps])
        _Z_CACHE[key] = out
    return _Z_CACHE[key]


def _z_mismatch(got, ref):
    return ~torch.isclose(got, ref, rtol=Z_RTOL, atol=Z_ATOL)


def _check_z(name, zs, sizes):
    """Kernel z vs lmo_ref at every step. Marsaglia-Tsang may decide a candidate at the
    accept/reject boundary differently in fp32 and fp64: allowed on 1e-5 of draws (none on the
    CPU's sizes). Returns, per step and tensor, the z the reference takes (lmo_ref's, or at such a
    flip the kernel's own, whose law is the same)."""
    refs, bad, total = [], 0, 0
    for s, z_s in enumerate(zs):
        ref_s = _ref_z(name, sizes, s)
        row = []
        for got, ref in zip(z_s, ref_s):
            miss = _z_mismatch(got, ref)
            bad, total = bad + int(miss.sum()), total + miss.numel()
            row.append(torch.where(miss, got, ref))
        refs.append(row)
    allowed = total // 100_000 if name.startswith("mt") else 0
    assert bad <= allowed, f"{name}: {bad} of {total} z differ from lmo_ref (allowed {allowed})"
    return refs


def _state(hyper, ps, gen):
    needs_v = isinstance(hyper, AdamWHyper)
    ms = [torch.randn(p.shape, generator=gen).abs().mul(0.1).to(p.device) for p in ps]
    vs = [torch.rand(p.shape, generator=gen).mul(0.01).to(p.device) for p in ps] if needs_v else None
    return ms, vs


def _run_and_check(backend, name, opt, dtypes, sizes, *, mech=None, offsets=None, seed=SEED):
    """N_STEPS fused LMO steps on fresh tensors vs the fp64 reference; `mech` / `offsets` replace
    what the kernel is given (the mutations of test_checker_catches_mutations)."""
    dev = _device(backend)
    pdt, gdt = dtypes
    hyper = HYPERS[opt]
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(n, generator=g).to(pdt).to(dev) for n, _ in sizes]
    ps[1] = ps[1].view(1, -1)  # shapes other than 1-D
    gs = [(torch.randn(p.shape, generator=g) * 3).to(gdt).to(dev) for p in ps]
    ms, vs = _state(hyper, ps, g)
    ref_zs = _check_z(name, _backend_z(backend, name, sizes), sizes)
    e_zs = [[Z_RTOL * z.abs() + Z_ATOL for z in row] for row in ref_zs]
    refs = [_ref_steps(p, gr, [row[i] for row in ref_zs], ms[i], vs[i] if vs else None, hyper,
                       noise_std=C, inv_b=1 / B, e_zs=[row[i] for row in e_zs])
            for i, (p, gr) in enumerate(zip(ps, gs))]
    gen = NoiseGenerator(secure=False, seed=seed)
    offs = offsets or [o for _, o in sizes]
    for t in range(1, N_STEPS + 1):
        used = fused_noisy_step(ps, gs, ms, vs, hyper=hyper, expected_batch_size=B, noise=gen, t=t,
                                global_offsets=offs, mechanism=mech or _mech(name),
                                backend=backend)
        assert used == t - 1
    assert gen.step == N_STEPS
    for i, (p64, m64, v64, e_p, e_m, e_v) in enumerate(refs):
        _assert_within(f"p{i}", ps[i], p64, e_p)
        _assert_within(f"m{i}", ms[i], m64, e_m)
        if v64 is not None:
            _assert_within(f"v{i}", vs[i], v64, e_v)


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"p{str(d[0])[6:]}-g{str(d[1])[6:]}")
@pytest.mark.parametrize("opt", list(HYPERS))
@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("backend", _backends())
def test_matches_lmo_reference_over_steps(backend, name, opt, dtypes):
    _run_and_check(backend, name, opt, dtypes, _sizes())


MUTATIONS = {
    # Gaussian stream words instead of LMO-DP's: a counter shared with the Gaussian noise
    "stream": lambda name: dict(mech=_with_stream(_mech(name), 0)),
    # every tensor one element further in the global index space
    "offset": lambda name: dict(offsets=[o + 1 for _, o in SIZES]),
    # noise 5 % too large
    "scale": lambda name: dict(mech=_mech(name, C * 1.05)),
}


def _with_stream(mech, stream):
    mech.stream = stream
    return mech


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("backend", _backends())
def test_checker_catches_mutations(backend, mutation):
    """The check above fails when the kernel is handed a wrong stream, offset or scale (the z of
    the extraction stays the true one, as a kernel bug in the update would leave it)."""
    with pytest.raises(AssertionError):
        _run_and_check(backend, "k2", "adamw", DTYPES[0], SIZES, **MUTATIONS[mutation]("k2"))


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("backend", ["triton"] + (["cuda"] if dpkern.cuda_available() else []))
def test_fused_z_is_the_samplers(backend, name):
    """The fused step adds what LMOMechanism.add_noise_ adds: bit for bit for Triton (the same
    device code), to the z tolerance for CUDA (its own libm) against the Triton sampler."""
    sizes = SIZES
    z = _backend_z(backend, name, sizes, n_steps=1)[0]
    gen = NoiseGenerator(secure=False, seed=SEED)
    for (n, o), got in zip(sizes, z):
        want = _mech(name, 1.0).sample(n, generator=gen, step=0, offset=o,
                                       device=_device(backend), backend="triton").double().cpu()
        if backend == "triton":
            assert torch.equal(got, want)
        else:
            assert int(_z_mismatch(got, want).sum()) == 0


@pytest.mark.parametrize("backend", _backends())
def test_same_z_under_sharding(backend):
    """Each rank holding a slice of every tensor at its own global offset draws the same z."""
    full = _backend_z(backend, "mt", SIZES, n_steps=1)[0]
    world = 3
    for rank in range(world):
        shard = [(n * (rank + 1) // world - n * rank // world, o + n * rank // world)
                 for n, o in SIZES]
        got = _backend_z(backend, "mt", [s for s in shard if s[0] > 0], n_steps=1)[0]
        want = [z[n * rank // world:n * (rank + 1) // world] for (n, _), z in zip(SIZES, full)]
        assert all(torch.equal(a, b) for a, b in zip(got, [w for w in want if w.numel() > 0]))


# ---- engine: make_private with an LMO-DP mechanism runs the fused step ----------------------------

ENGINE_OPTS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
}


def _engine_run(opt, fused, backend, device, steps=3, seed=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.LayerNorm(9), nn.Linear(9, 4)).to(device)
    mech = LMOMechanism(PARAMS["k1"], clip_norm=0.7, accounting="certified")
    model, dp, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=ENGINE_OPTS[opt](model.parameters()), data_loader=None,
        noise_multiplier=None, max_grad_norm=0.7, expected_batch_size=4, sample_rate=0.1,
        seed=seed, mechanism=mech, loss_reduction="sum", average_sum=True)  # "sum": GPU tf32r
    assert dp.fused_available()
    dp.fused, dp.noise_backend = fused, None if backend == "auto" else backend
    g = torch.Generator().manual_seed(0)
    for k in range(steps):
        x, y = torch.randn(4, 6, generator=g), torch.randint(0, 4, (4,), generator=g)
        if k == 1:
            dp.signal_empty_batch()  # an empty batch still releases LMO-DP noise
        else:
            nn.functional.cross_entropy(model(x.to(device)), y.to(device), reduction="sum").backward()
        dp.step()
        if fused:
            assert all(p.grad is None for p in model.parameters())  # nothing materialised
        dp.zero_grad()
    assert dp.noise_generator.step == steps
    return [p.detach().double().cpu() for p in model.parameters()]


@pytest.mark.parametrize("opt", list(ENGINE_OPTS))
@pytest.mark.parametrize("backend", ["torch", "triton"] + (["auto"] if dpkern.cuda_available()
                                                           else []))
def test_engine_fused_equals_unfused(backend, opt):
    """"auto" on a GPU: the fused step runs the CUDA kernel, the unfused one adds the noise with
    the Triton sampler (the standalone sampler has no CUDA backend)."""
    device = "cuda" if HAS_GPU and backend != "torch" else "cpu"
    fused = _engine_run(opt, True, backend, device)
    unfused = _engine_run(opt, False, backend, device)
    for a, b in zip(fused, unfused):  # the same noise; fp32 rounding apart (z*C/B vs (C*lap/u)/B)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    other_key = _engine_run(opt, True, backend, device, seed=6)
    assert any(not torch.allclose(a, b) for a, b in zip(fused, other_key))


def test_engine_overridden_add_noise_stays_unfused():
    """A mechanism whose add_noise_ is not LMOMechanism's own could add other noise: unfused."""
    class Custom(LMOMechanism):
        def add_noise_(self, grad, **kw):
            return super().add_noise_(grad, **kw)

    model = nn.Linear(3, 2)
    _, dp, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=None,
        noise_multiplier=None, max_grad_norm=1.0, expected_batch_size=2, sample_rate=0.1, seed=0,
        mechanism=Custom(PARAMS["k1"], accounting="certified"))
    assert not dp.fused_available()


# ---- refused input --------------------------------------------------------------------------------

def _bad_cases():
    p = lambda *s: torch.randn(*s)  # noqa: E731
    lmo = _mech("k1")
    return {
        "gaussian_mechanism": (dict(mechanism=GaussianMechanism(1.0, 0.7)), TypeError,
                               "LMOMechanism"),
        "mechanism_str": (dict(mechanism="lmo"), TypeError, "LMOMechanism"),
        "lmo_with_noise_std": (dict(mechanism=lmo, noise_std=1.0), ValueError, "noise_std must be None"),
        "gaussian_without_noise_std": (dict(noise_std=None), ValueError, "noise_std"),
        "counter_wraps": (dict(mechanism=_mech("mt"), global_offsets=[(1 << 62) - 8]), ValueError,
                          "wrap"),
        "lmo_grads_shape": (dict(mechanism=lmo, grads=[p(5)]), ValueError, r"grads\[0\] has shape"),
        "lmo_cuda_on_cpu": (dict(mechanism=lmo, backend="cuda"), (RuntimeError, ValueError), "cuda"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_refused_and_nothing_written(case):
    if case == "lmo_cuda_on_cpu" and HAS_GPU and not dpkern.cuda_available():
        pytest.skip("needs the extension to reach the device check")
    kwargs, err, match = _bad_cases()[case]
    params = [torch.randn(4)]
    args = dict(params=params, grads=[torch.randn(4)], hyper=SGDHyper(lr=0.1), noise_std=None,
                expected_batch_size=4.0, backend="torch")
    args.update(kwargs)
    gen = NoiseGenerator(secure=False, seed=0)
    before = [x.clone() for x in params]
    with pytest.raises(err, match=match):
        fused_noisy_step(noise=gen, **args)
    assert all(torch.equal(x, b) for x, b in zip(params, before))
    assert gen.step == 0  # no counter step was consumed


@pytest.mark.gpu
def test_cuda_binding_refuses_a_layout_mismatch():
    """The C API checks n_blocks against the Gamma path: a mismatch would read other coordinates'
    counters. Nothing is launched, nothing is written."""
    if not dpkern.cuda_available():
        pytest.skip("CUDA extension not built")
    from dpkern.noise import step as S
    ext = dpkern._ext.require_cuda_ext()
    p = torch.randn(64, device="cuda")
    g = torch.randn(64, device="cuda")
    before = p.clone()
    desc, table, n_t, n_c = S._descriptors(ext, [p], [g], [None], [None], [0])
    consts = dict(R.kernel_constants(PARAMS["mt"]), n_blocks=2)
    scal, opt, _ = S.kernel_scalars(SGDHyper(lr=0.1), noise_std=1.0, inv_b=0.5, t=1)
    with pytest.raises(ValueError, match="n_blocks"):
        ext.noisy_step_lmo(tensors=desc.data_ptr(), chunk_tensor=table.data_ptr(), n_tensors=n_t,
                           n_chunks=n_c, param_dtype=0, grad_dtype=0, optimizer=opt, k0=1, k1=2,
                           c2=3, c3=4, noise_std=1.0, inv_b=0.5, lr=0.1, weight_decay=0.0,
                           decay=1.0, momentum=0.0, one_minus_dampening=1.0, nesterov=False,
                           first_step=False, beta1=0.0, beta2=0.0, eps=1.0, step_size=0.0,
                           inv_sqrt_bc2=1.0, stream=torch.cuda.current_stream().cuda_stream,
                           **consts)
    torch.cuda.synchronize()
    assert torch.equal(p, before)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PARAMS))
def test_cuda_large_matches_reference(name):
    """2^22 + 5 coordinates at an unaligned offset past 2^32 (counter words c0 and c1 both used):
    CUDA's z against lmo_ref on the GPU; Marsaglia-Tsang flips on at most 1e-6 of coordinates."""
    if not dpkern.cuda_available():
        pytest.skip("CUDA extension not built")
    n, off = (1 << 22) + 5, (1 << 32) + 3
    z = _backend_z("cuda", name, [(n, off)], n_steps=1)[0][0]
    ref = _ref_z(name, [(n, off)], 0, device="cuda")[0]
    bad = int(_z_mismatch(z, ref).sum())
    assert bad <= (n // 1_000_000 if name.startswith("mt") else 0)
