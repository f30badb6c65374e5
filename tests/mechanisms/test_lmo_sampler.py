"""LMO-DP sampler: Philox, the uniforms -> noise transform, the fused kernel vs the float64
reference, and the sampled law against its exact CDF (KS)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from dpkern.mechanisms import lmo_ref as R
from dpkern.mechanisms import noise_ops as N
from dpkern.mechanisms.lmo_accountant import log_mgf
from dpkern.mechanisms.lmo_params import PAPER_DEFAULT, LMOParams
from dpkern.noise import NoiseGenerator
from tests.conftest import HAS_GPU, kernel_devices
from tests.tolerance import OUTPUT_EPS

# One configuration per Gamma path: k = 1, 2, 0.5 closed forms; Marsaglia-Tsang for k > 1 and k < 1.
PARAMS = {
    "k1": PAPER_DEFAULT,
    "k2": LMOParams(a1=0.5, a3=0.2, a4=0.3, theta=0.8, k=2.0, lam=2.0, a=0.0, b=1.0),
    "k05": LMOParams(a1=0.9, a3=0.1, a4=0.1, theta=2.0, k=0.5, lam=1.0, a=1.0, b=3.0),
    "mt": LMOParams(a1=0.4, a3=0.1, a4=0.2, theta=0.5, k=3.7, lam=10.0, a=0.5, b=1.0),
    "mt_boost": LMOParams(a1=0.7, a3=0.3, a4=0.1, theta=1.0, k=0.3, lam=0.5, a=0.0, b=2.0),
}
SEED = 20240527


def W(step, seed=SEED, stream=R.STREAM_LMO):
    """dpkern.noise kernel words for a deterministic test generator."""
    return NoiseGenerator(secure=False, seed=seed).kernel_words(step, stream=stream)
# Kernel (fp32) vs reference (fp64): a few fp32 roundings in log/cos/exp and two divisions. On the
# GPU, Triton's log lowers to lg2.approx (absolute error ~2^-22), so noise values near 0 also get
# an absolute allowance (noise is O(1-100) in units of C).
RTOL = 64 * OUTPUT_EPS[torch.float32]
ATOL = 1e-5


def exact_cdf(p: LMOParams):
    """P(noise <= x) = M(x)/2 for x < 0 and 1 - M(-x)/2 for x >= 0 (Laplace mixed over u)."""
    def cdf(x):
        x = np.asarray(x, dtype=np.float64)
        half = 0.5 * np.exp(log_mgf(p, -np.abs(x)))
        return np.where(x < 0, half, 1 - half)
    return cdf


def test_uniform_map_is_open_and_symmetric():
    x = torch.tensor([0, 511, 512, 0xFFFFFFFF, 0x80000000], dtype=torch.int64)
    u = R.uniform_from_bits(x)
    assert u[0] == u[1] == 2.0**-24 and u[2] == 3 * 2.0**-24 and u[3] == 1 - 2.0**-24
    assert u[4] == 0.5 + 2.0**-24 and torch.all((u > 0) & (u < 1))
    assert float(u.float()[3]) < 1.0  # exact in fp32 too


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_transform_on_chosen_uniforms(name, backend):
    """Kernel device code (FROM_PTR) vs float64 reference on random and extreme uniforms."""
    p = PARAMS[name]
    need = 4 * R.lmo_blocks(p)
    g = torch.Generator().manual_seed(5)
    m = torch.randint(0, 2**23, (257, need), generator=g)
    m[:4] = torch.tensor([0, 2**23 - 1, 2**22, 2**22 - 1])[:, None]  # ends and the middle
    U = (m.double() * 2 + 1) * 2.0**-24
    ref = R.lmo_noise_from_uniforms(U, p)
    dev = kernel_devices()[0]
    out = N.lmo_noise_from_uniforms((U if backend == "torch" else U.float()).to(dev), p,
                                    backend=backend).cpu()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=ATOL)
    assert torch.all(ref[:2] != 0) and ref[0] < 0 < ref[1]  # sign from U2 - 1/2


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("n", [0, 1, 63, 1000])
@pytest.mark.parametrize("device", kernel_devices())
def test_fused_sample_matches_reference(device, n, name):
    p = PARAMS[name]
    out = N.lmo_noise_sample(n, p, words=W(7), offset=3, device=device, backend="triton")
    ref = R.lmo_noise_ref(n, p, words=W(7), offset=3)
    assert out.shape == (n,) and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_noise_add_in_place(backend, dtype):
    """grad += C * noise, accumulated in fp32, rounded once to grad's dtype."""
    device = kernel_devices()[0]
    p, C, n = PARAMS["k2"], 0.7, 517
    grad = torch.randn(11, 47, device=device).to(dtype)     # any shape, treated as flat
    before = grad.clone()
    ret = N.lmo_noise_add_(grad, p, words=W(2), clip_norm=C, offset=100, backend=backend)
    assert ret is grad
    want = before.double().view(-1).cpu() + C * R.lmo_noise_ref(n, p, words=W(2), offset=100)
    torch.testing.assert_close(grad.view(-1).cpu().double(), want.to(dtype).double(),
                               rtol=2 * OUTPUT_EPS[dtype] + RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_noise_is_counter_based(backend):
    """Shards at an offset reproduce the same noise; a new step or key gives fresh noise."""
    device = kernel_devices()[0]
    p = PARAMS["mt"]
    full = N.lmo_noise_sample(300, p, words=W(4), device=device, backend=backend)
    tail = N.lmo_noise_sample(100, p, words=W(4), offset=200, device=device, backend=backend)
    assert torch.equal(full[200:], tail)
    other_step = N.lmo_noise_sample(300, p, words=W(5), device=device, backend=backend)
    other_key = N.lmo_noise_sample(300, p, words=W(4, seed=SEED + 1), device=device, backend=backend)
    assert not torch.isclose(full, other_step).any() and not torch.isclose(full, other_key).any()
    gauss = torch.zeros(300, device=device)
    N.gaussian_noise_add_(gauss, std=1.0, words=W(4, stream=0), backend=backend)
    assert not torch.isclose(full, gauss).any()  # stream 0 vs 1: not a reused counter


def _ks(z: torch.Tensor, p: LMOParams):
    return stats.kstest(z.double().cpu().numpy(), exact_cdf(p))


@pytest.mark.parametrize("name", list(PARAMS))
def test_reference_law_ks(name):
    """Large reference sample vs the exact mixture CDF. Deterministic key: not flaky."""
    p = PARAMS[name]
    z = R.lmo_noise_ref(60_000, p, words=W(1))
    assert _ks(z, p).pvalue > 1e-3


@pytest.mark.parametrize("name", list(PARAMS))
def test_kernel_law_ks(name):
    p = PARAMS[name]
    device = kernel_devices()[0]
    n = 1 << 23 if HAS_GPU else 8192
    z = N.lmo_noise_sample(n, p, words=W(3, seed=SEED + 17), device=device, backend="triton")
    assert _ks(z, p).pvalue > 1e-3


def test_ks_rejects_lam_read_as_a_scale():
    """The KS check can fail: the artifact's convention (lam as a scale) has a different law."""
    p = PAPER_DEFAULT
    wrong = LMOParams(**{**p.as_dict(), "lam": 1 / p.lam})  # rate 1/lam == numpy scale lam
    z = R.lmo_noise_ref(100_000, wrong, words=W(1))
    assert _ks(z, p).pvalue < 1e-6


@pytest.mark.parametrize("k", [0.5, 1.0, 2.0, 3.7, 0.3, 12.0])
def test_gamma_paths_ks(k):
    p = LMOParams(k=k)
    U = R.counter_uniforms(20_000, R.lmo_blocks(p), W(9))
    g = R.gamma_from_uniforms(U, k).numpy()
    assert stats.kstest(g, stats.gamma(k).cdf).pvalue > 1e-3


@pytest.mark.parametrize("k", [1.01, 3.7, 0.3])
def test_marsaglia_tsang_rarely_needs_the_fallback(k):
    """Two candidates both rejected on < 0.5 % of coordinates (acceptance >= 0.95 per candidate),
    so all 8 default candidates are rejected with probability < (0.005)^4 ~ 1e-9 (README)."""
    p = LMOParams(k=k)
    U = R.counter_uniforms(100_000, R.lmo_blocks(p, 2), W(0))
    _, found = R.marsaglia_tsang(U, k, rounds=2)
    frac = 1 - float(found.double().mean())
    assert 0 < frac < 0.005, frac


@pytest.mark.parametrize("bad,err,match", [
    (dict(grad=torch.ones(4, dtype=torch.int32)), TypeError, "float32, float16 or bfloat16"),
    (dict(grad=torch.ones(4, 4).t()), ValueError, "contiguous"),
    (dict(words={"k0": 1}), ValueError, "kernel_words"),
    (dict(words={"k0": 2**31, "k1": 0, "c2": 0, "c3": 0}), ValueError, "int32"),
    (dict(offset=-3), ValueError, "offset"),
    (dict(rounds=3, params=PARAMS["mt"]), ValueError, "rounds"),
    (dict(params={"k": 1}), TypeError, "LMOParams"),
])
def test_noise_add_rejects_bad_input(bad, err, match):
    args = dict(grad=torch.zeros(4), params=PAPER_DEFAULT, words=W(0), offset=0, rounds=8)
    args.update(bad)
    grad, params = args.pop("grad"), args.pop("params")
    with pytest.raises(err, match=match):
        N.lmo_noise_add_(grad, params, backend="torch", **args)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PARAMS))
def test_full_size_kernel_matches_reference_gpu(name):
    """64 M coordinates on the GPU vs the float64 reference on the GPU. For Marsaglia-Tsang, a
    candidate at the accept/reject boundary may be decided differently in fp32 vs fp64; allow
    that on at most 1e-6 of coordinates."""
    p, n, off, chunk = PARAMS[name], 1 << 26, 1 << 33, 1 << 23
    grad = torch.zeros(n, device="cuda")
    N.lmo_noise_add_(grad, p, words=W(123), offset=off, backend="triton")
    bad = 0
    for s in range(0, n, chunk):
        ref = R.lmo_noise_ref(chunk, p, words=W(123), offset=off + s, device="cuda")
        bad += int((~torch.isclose(grad[s:s + chunk].double(), ref, rtol=RTOL, atol=ATOL)).sum())
    assert bad <= (n // 1_000_000 if name.startswith("mt") else 0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("n,offsets", [(6, [0, 4099, 7]), (1, [3]), (63, [8, 1 << 33]),
                                       (5, []), (0, [2, 9])], ids=str)
def test_gaussian_segments_equal_one_add_per_segment(backend, n, offsets):
    """gaussian_noise_segments (one launch for L segments, DP-SFT's per-layer noise) gives row k
    exactly what gaussian_noise_add_ adds to n zeros at global offset offsets[k], on each backend."""
    device = kernel_devices()[0]
    words = W(9, stream=0)
    z = N.gaussian_noise_segments(n, offsets, std=0.7, words=words, device=device, backend=backend)
    assert z.shape == (len(offsets), n) and z.dtype == torch.float32
    for k, off in enumerate(offsets):
        one = torch.zeros(n, device=device)
        N.gaussian_noise_add_(one, std=0.7, words=words, offset=off, backend=backend)
        assert torch.equal(z[k], one), (k, off)
    if len(offsets) > 1 and n > 1:
        assert not torch.equal(z[0], z[1])  # distinct offsets, distinct noise


def test_gaussian_segments_refused():
    with pytest.raises(ValueError, match="offset"):
        N.gaussian_noise_segments(4, [0, -1], std=1.0, words=W(1, stream=0))
    with pytest.raises(ValueError, match="counter space"):
        N.gaussian_noise_segments(4, [2**62 - 2], std=1.0, words=W(1, stream=0))
    with pytest.raises(ValueError, match="n must be"):
        N.gaussian_noise_segments(-1, [0], std=1.0, words=W(1, stream=0))
