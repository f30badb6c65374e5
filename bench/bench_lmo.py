"""LMO-DP fused sampler throughput (GB/s of the gradient buffer read + written) next to the
Gaussian noise-add kernel with the same counter-based RNG and torch's randn_like + add_.

Each Gamma path is a case: k = 1 (one Philox call per coordinate), k = 2 and k = 0.5 (two),
Marsaglia-Tsang with 8 candidates (five). A case checks its first 2^20 coordinates against the
float64 reference before it is timed.
"""
import pytest
import torch

from bench import registry
from bench.conftest import HAS_GPU
from dpkern.mechanisms import noise_ops as N
from dpkern.mechanisms import lmo_ref as R
from dpkern.mechanisms.lmo_params import LMOParams
from dpkern.noise import NoiseGenerator

SIZES = [s[0] for s in registry.shapes("noise_add")]
DTYPES = registry.torch_dtypes("noise_add")
LMO_CASES = {"k1": LMOParams(k=1.0), "k2": LMOParams(k=2.0), "k05": LMOParams(k=0.5),
             "mt": LMOParams(k=3.7)}
GEN = NoiseGenerator(secure=False, seed=1234)


def _device():
    return "cuda" if HAS_GPU else "cpu"


def _backend():
    return "triton" if HAS_GPU else "torch"


def _check_lmo(p, dtype):
    n = min(1 << 20, SIZES[0])
    z = torch.zeros(n, device=_device(), dtype=torch.float32)
    N.lmo_noise_add_(z, p, words=GEN.kernel_words(0, R.STREAM_LMO), backend=_backend())
    ref = R.lmo_noise_ref(n, p, words=GEN.kernel_words(0, R.STREAM_LMO), device=_device())
    bad = ~torch.isclose(z.double(), ref, rtol=1e-5, atol=1e-5)
    assert int(bad.sum()) <= n // 1_000_000  # MT accept flips in fp32 vs fp64 (see tests)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("case", list(LMO_CASES))
def test_lmo_noise_add_bench(timed, case, n, dtype):
    p = LMO_CASES[case]
    _check_lmo(p, dtype)
    grad = torch.zeros(n, device=_device(), dtype=dtype)
    words = GEN.kernel_words(1, R.STREAM_LMO)
    info = timed(lambda: N.lmo_noise_add_(grad, p, words=words, backend=_backend()),
                 bytes_moved=2 * n * grad.element_size())
    info.update(op="lmo_noise_add_", backend=_backend(), gamma_path=case, dtype=str(dtype),
                n=n, philox_calls_per_coord=R.lmo_blocks(p))


@pytest.mark.parametrize("impl", ["counter_kernel", "torch_randn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_gaussian_noise_add_bench(timed, impl, n, dtype):
    grad = torch.zeros(n, device=_device(), dtype=dtype)
    if impl == "counter_kernel":
        z = torch.zeros(min(n, 1 << 20), device=_device())
        N.gaussian_noise_add_(z, std=1.0, words=GEN.kernel_words(0), backend=_backend())
        ref = R.gaussian_noise_ref(z.numel(), words=GEN.kernel_words(0), device=_device())
        torch.testing.assert_close(z.double(), ref, rtol=1e-5, atol=1e-5)
        words = GEN.kernel_words(1)
        fn = lambda: N.gaussian_noise_add_(grad, std=1.0, words=words, backend=_backend())  # noqa: E731
    else:  # materialises a full-size noise tensor: 3 passes over memory, not 2
        fn = lambda: grad.add_(torch.randn_like(grad))  # noqa: E731
    info = timed(fn, bytes_moved=2 * n * grad.element_size(), baseline=impl == "torch_randn")
    info.update(op="gaussian_noise_add_", backend=impl, dtype=str(dtype), n=n)
