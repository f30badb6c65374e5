"""fused_noisy_release_: the noise of fused_noisy_step written into the gradients (the release pass
that lets post-processors run between noise and update).

Per backend, Gaussian and LMO-DP: the release's z is the fused step's own z, bit for bit, and the
reference's to its tolerance; at awkward sizes and offsets, tensors laid in one NaN buffer with
gaps, the release matches the fp64 formula on its own z and never writes a gap; release + a
noise-free fused step equals one fused step bit for bit (every optimizer, fp32 and bf16
parameters, several steps); noise_std = 0 is g / B exactly; refused input changes nothing."""
import pytest
import torch

import dpkern
from dpkern.mechanisms import GaussianMechanism
from dpkern.noise import NoiseGenerator, SGDHyper, fused_noisy_release_, fused_noisy_step
from dpkern.noise.reference import noisy_grad_ref, tensor_normals
from tests.conftest import HAS_GPU
from tests.noise import test_noise_step as G
from tests.noise import test_noise_step_lmo as L

# (numel, global offset): 1, 7, 63 elements at offsets that are not multiples of 8 (scalar paths and
# tails), then 8-aligned tensors (CUDA's vector path); a gap in the global index space. On a GPU,
# also several 8192-element chunks of the CUDA kernel, aligned and not.
SIZES = L.SIZES
GPU_SIZES = L.GPU_SIZES
SIGMA_C, B, SEED = 2.0, 6.0, L.SEED  # B: 1 / B not exact in binary
MECHS = ["gaussian", "lmo_k1", "lmo_mt"]  # LMO-DP: the k = 1 closed form and Marsaglia-Tsang
N_STEPS = 3


def _sizes():
    return GPU_SIZES if HAS_GPU else SIZES


def _noise_kw(mech: str, scale: float = SIGMA_C) -> dict:
    """fused_noisy_step / fused_noisy_release_'s noise arguments: z scaled by `scale`."""
    if mech == "gaussian":
        return dict(noise_std=scale)
    return dict(mechanism=L._mech(mech.removeprefix("lmo_"), clip=scale))


def _release(backend, mech, sizes, grads, *, scale=SIGMA_C, b=B, seed=SEED, gen=None):
    gen = gen or NoiseGenerator(secure=False, seed=seed)
    return fused_noisy_release_(grads, expected_batch_size=b, noise=gen,
                                global_offsets=[o for _, o in sizes], backend=backend,
                                **_noise_kw(mech, scale))


def _release_z(backend, mech, sizes):
    """z of the release at counter step 0: g = 0, scale 1 and B = 1 make it write exactly z."""
    gs = [torch.zeros(n, device=L._device(backend)) for n, _ in sizes]
    _release(backend, mech, sizes, gs, scale=1.0, b=1.0)
    return [g.double().cpu() for g in gs]


def _step_z(backend, mech, sizes):
    """z of fused_noisy_step at counter step 0 (plain SGD on p = 0, g = 0 writes -z)."""
    if mech == "gaussian":
        return G._backend_z([n for n, _ in sizes], [o for _, o in sizes], L._device(backend),
                            backend, SEED, 1)[0]
    return L._backend_z(backend, mech.removeprefix("lmo_"), sizes, n_steps=1)[0]


@pytest.mark.parametrize("mech", MECHS)
@pytest.mark.parametrize("backend", G._backends())
def test_release_z_is_the_fused_steps(backend, mech):
    """The release adds the fused step's z (same counter step, offsets, stream), bit for bit; and
    that z is the reference sampler's (tensor_normals; lmo_ref to the LMO z tolerance)."""
    sizes = _sizes()
    z = _release_z(backend, mech, sizes)
    for i, (a, b) in enumerate(zip(z, _step_z(backend, mech, sizes))):
        assert torch.equal(a, b), f"tensor {i}: the release drew other noise than the fused step"
    if mech == "gaussian":
        words = NoiseGenerator(secure=False, seed=SEED).kernel_words(0)
        for a, (n, o) in zip(z, sizes):
            ref = tensor_normals(n, o, words).double()
            if backend == "torch" and L._device(backend) == "cpu":  # the same ops, same device
                assert torch.equal(a, ref)
            else:
                torch.testing.assert_close(a, ref, rtol=2e-6, atol=2e-6)
    else:
        L._check_z(mech.removeprefix("lmo_"), [z], sizes)


def _gapped(sizes, device, gap=3):
    """fp32 tensors of `sizes` as views of one NaN buffer with `gap` elements between them (their
    pointers at various alignments mod 16 bytes), filled with N(0, 9); returns (views, buffer,
    the gaps as slices)."""
    total = sum(n for n, _ in sizes) + gap * (len(sizes) + 1)
    buf = torch.full((total,), float("nan"), device=device)
    gen = torch.Generator().manual_seed(0)
    views, gaps, at = [], [], gap
    for n, _ in sizes:
        views.append(buf[at:at + n])
        views[-1].copy_(torch.randn(n, generator=gen) * 3)
        gaps.append(slice(at + n, at + n + gap))
        at += n + gap
    return views, buf, [slice(0, gap)] + gaps


@pytest.mark.parametrize("mech", MECHS)
@pytest.mark.parametrize("backend", G._backends())
def test_release_matches_reference(backend, mech):
    """(g + s z) / B on the backend's own z (checked above) against fp64, within the fp32 error
    of an fma and a multiply; the torch backend is the reference (noisy_grad_ref) exactly; no
    element outside the gradients is written."""
    sizes = _sizes()
    dev = L._device(backend)
    gs, buf, gaps = _gapped(sizes, dev)
    g0 = [g.double().cpu() for g in gs]
    z = _release_z(backend, mech, sizes)
    gen = NoiseGenerator(secure=False, seed=SEED)
    assert _release(backend, mech, sizes, gs, gen=gen) == 0 and gen.step == 1
    for gap in gaps:
        assert torch.isnan(buf[gap]).all(), "the release wrote outside its tensors"
    for i, (g, a, zk) in enumerate(zip(gs, g0, z)):
        if backend == "torch":
            want = noisy_grad_ref(a.float(), zk.float(), noise_std=SIGMA_C, inv_b=1 / B)
            assert torch.equal(g.cpu(), want), f"g{i}"
        ref = (a + SIGMA_C * zk) / B
        bound = 2 * G.OP * (a.abs() + SIGMA_C * zk.abs()) / B + 1e-30
        G._assert_within(f"g{i}", g, ref, bound)


@pytest.mark.parametrize("backend", G._backends())
def test_release_without_noise_is_the_scaling(backend):
    """noise_std = 0: g * (1 / B) exactly (no z drawn); a counter step is still taken."""
    sizes = SIZES
    gs, _, _ = _gapped(sizes, L._device(backend))
    want = [g * (1 / 3.0) for g in gs]
    gen = NoiseGenerator(secure=False, seed=SEED)
    _release(backend, "gaussian", sizes, gs, scale=0.0, b=3.0, gen=gen)
    assert all(torch.equal(g, w) for g, w in zip(gs, want)) and gen.step == 1


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32).cpu()


@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16], ids=["p_fp32", "p_bf16"])
@pytest.mark.parametrize("opt", list(G.HYPERS))
@pytest.mark.parametrize("mech", ["gaussian", "lmo_k1"])
@pytest.mark.parametrize("backend", G._backends())
def test_release_then_noise_free_step_is_one_step(backend, mech, opt, pdt):
    """Per step k: fused_noisy_release_(g, s, B, step k) then fused_noisy_step(g, noise_std=0,
    B=1, step k) leaves p, m, v bit-identical to fused_noisy_step(g, s, B, step k), over N_STEPS
    steps (new gradients each step, momentum's first step, AdamW's bias correction); the release
    takes the one counter step, the noise-free update none."""
    sizes = SIZES
    dev = L._device(backend)
    hyper = G.HYPERS[opt]
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randn(n, generator=gen).to(pdt).to(dev) for n, _ in sizes]
    ps[2] = ps[2].view(7, 9)  # shapes other than 1-D
    ms, vs = L._state(hyper, ps, gen)
    if isinstance(hyper, SGDHyper) and hyper.momentum == 0:
        ms = None
    runs = {k: ([p.clone() for p in ps], None if ms is None else [m.clone() for m in ms],
                None if vs is None else [v.clone() for v in vs],
                NoiseGenerator(secure=False, seed=SEED)) for k in ("one", "two")}
    offs = [o for _, o in sizes]
    for t in range(1, N_STEPS + 1):
        grads = [(torch.randn(p.shape, generator=gen) * 3).to(dev) for p in ps]
        p1, m1, v1, gen1 = runs["one"]
        fused_noisy_step(p1, [g.clone() for g in grads], m1, v1, hyper=hyper, expected_batch_size=B,
                         noise=gen1, t=t, global_offsets=offs, backend=backend, **_noise_kw(mech))
        p2, m2, v2, gen2 = runs["two"]
        g2 = [g.clone() for g in grads]
        step = fused_noisy_release_(g2, expected_batch_size=B, noise=gen2, global_offsets=offs,
                                    backend=backend, **_noise_kw(mech))
        fused_noisy_step(p2, g2, m2, v2, hyper=hyper, noise_std=0.0, expected_batch_size=1,
                         noise=gen2, t=t, counter_step=step, global_offsets=offs, backend=backend)
        assert step == t - 1 and gen1.step == gen2.step == t
    for name, k in (("p", 0), ("m", 1), ("v", 2)):
        for i, (a, b) in enumerate(zip(runs["one"][k] or [], runs["two"][k] or [])):
            assert torch.equal(_bits(a), _bits(b)), f"{name}{i} differs from the one-pass step"


def test_check_catches_other_noise():
    """The bit-identity above fails when the release draws other noise (counter step + 1)."""
    sizes = SIZES[:3]
    ps = [torch.zeros(n) for n, _ in sizes]
    ps2 = [p.clone() for p in ps]
    grads = [torch.randn(n) for n, _ in sizes]
    offs = [o for _, o in sizes]
    hyper = G.HYPERS["sgd"]
    fused_noisy_step(ps, [g.clone() for g in grads], hyper=hyper, noise_std=SIGMA_C,
                     expected_batch_size=B, noise=NoiseGenerator(secure=False, seed=SEED),
                     global_offsets=offs, backend="torch")
    fused_noisy_release_(grads, noise_std=SIGMA_C, expected_batch_size=B, counter_step=1,
                         noise=NoiseGenerator(secure=False, seed=SEED), global_offsets=offs,
                         backend="torch")
    fused_noisy_step(ps2, grads, hyper=hyper, noise_std=0.0, expected_batch_size=1, counter_step=0,
                     noise=NoiseGenerator(secure=False, seed=SEED), global_offsets=offs,
                     backend="torch")
    assert not all(torch.equal(a, b) for a, b in zip(ps, ps2))


def _bad_cases():
    g = lambda *s: torch.randn(*s)  # noqa: E731
    return {
        "empty": (dict(grads=[]), ValueError, "non-empty"),
        "not_a_list": (dict(grads=g(4)), ValueError, "non-empty list"),
        "grad_bf16": (dict(grads=[g(4), g(4).bfloat16()]), TypeError,
                      r"grads\[1\] must be float32, got torch.bfloat16"),
        "grad_noncontig": (dict(grads=[g(4, 4).t()]), ValueError, r"grads\[0\] must be contiguous"),
        "mixed_devices": (dict(grads=[g(4), torch.empty(4, device="meta")]), ValueError,
                          "one device per call"),
        "overlap": (dict(grads=[g(4), g(4)], global_offsets=[0, 2]), ValueError, "overlap"),
        "offsets_len": (dict(grads=[g(4)], global_offsets=[0, 4]), ValueError, "global_offsets"),
        "noise_std_nan": (dict(noise_std=float("nan")), ValueError, "noise_std"),
        "noise_std_neg": (dict(noise_std=-1.0), ValueError, "noise_std"),
        "noise_std_missing": (dict(noise_std=None), ValueError, "noise_std"),
        "batch_zero": (dict(expected_batch_size=0), ValueError, "expected_batch_size"),
        "gaussian_mechanism": (dict(noise_std=None, mechanism=GaussianMechanism(1.0, 0.7)),
                               TypeError, "LMOMechanism"),
        "lmo_with_noise_std": (dict(mechanism=L._mech("k1")), ValueError, "noise_std must be None"),
        "lmo_counter_wraps": (dict(noise_std=None, mechanism=L._mech("mt"),
                                   global_offsets=[(1 << 62) - 8]), ValueError, "wrap"),
        "noise_not_generator": (dict(noise=object()), TypeError, "NoiseGenerator"),
        "cuda_on_cpu": (dict(backend="cuda"), (RuntimeError, ValueError), "cuda"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_refused_and_nothing_written(case):
    if case == "cuda_on_cpu" and HAS_GPU and not dpkern.cuda_available():
        pytest.skip("needs the extension to reach the device check")
    kwargs, err, match = _bad_cases()[case]
    gen = NoiseGenerator(secure=False, seed=0)
    args = dict(grads=[torch.randn(4)], noise_std=1.0, expected_batch_size=4.0, noise=gen,
                backend="torch")
    args.update(kwargs)
    grads = args["grads"] if isinstance(args["grads"], list) else []
    before = [x.clone() for x in grads if x.device.type != "meta"]
    with pytest.raises(err, match=match):
        fused_noisy_release_(**args)
    for x, b in zip(grads, before):
        assert torch.equal(x, b)
    assert gen.step == 0  # no counter step was consumed


@pytest.mark.gpu
def test_cuda_release_refuses_cpu_tensors_and_the_binding_bf16_grads():
    """The launcher refuses CPU tensors with the backend named; the binding refuses a release
    over bf16 gradients (the kernel writes fp32 only), before any launch."""
    if not dpkern.cuda_available():
        pytest.skip("CUDA extension not built")
    gen = NoiseGenerator(secure=False, seed=0)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fused_noisy_release_([torch.randn(8)], noise_std=1.0, expected_batch_size=2, noise=gen,
                             backend="cuda")
    assert gen.step == 0
    from dpkern.noise import step as S
    g = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    before = g.clone()
    scalars, _, _ = S.kernel_scalars(G.HYPERS["sgd"], noise_std=1.0, inv_b=0.5, t=1)
    with pytest.raises(ValueError, match="fp32 gradients only"):
        S._launch_cuda([None], [g], [None], [None], [0], scalars, S._OPT_RELEASE, False, False,
                       gen.kernel_words(0), None)
    torch.cuda.synchronize()
    assert torch.equal(g, before)
