"""rownorm_sq: every backend against the float64 reference, awkward shapes, poisoned outputs."""
import pytest
import torch

import dpkern
from dpkern.reference.rownorm import rownorm_sq_ref
from tests.conftest import HAS_GPU, kernel_devices
from tests.tolerance import assert_close_reduction

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 4097), (0, 8), (7, 0), (3, 63), (5, 60), (33, 1000)]
GPU_SHAPES = SHAPES + [(256, 65537), (4096, 4096), (2, 3_000_000)]


def _backends():
    bes = ["triton", "torch"]
    if dpkern.cuda_available():
        bes.append("cuda")
    return bes


def _inputs(shape, dtype, device, layout):
    b, n = shape
    if layout == "contiguous":
        return torch.randn(b, n, device=device).to(dtype)
    if layout == "transposed":  # stride_xn != 1
        return torch.randn(n, b, device=device).to(dtype).t()
    # row slice of a wider buffer with an odd offset: unaligned rows, stride_xb != N
    return torch.randn(b, n + 3, device=device).to(dtype)[:, 1:n + 1]


def _shapes():
    return GPU_SHAPES if HAS_GPU else SHAPES


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: f"B{s[0]}xN{s[1]}")
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("device", kernel_devices())
def test_rownorm_matches_reference(device, backend, shape, dtype, layout):
    if backend == "cuda" and device != "cuda":
        pytest.skip("cuda backend needs a GPU")
    torch.manual_seed(hash((shape, str(dtype), layout)) % 2**31)
    x = _inputs(shape, dtype, device, layout)
    out = dpkern.rownorm_sq(x, backend=backend)
    assert out.shape == (shape[0],) and out.dtype == torch.float32 and out.device == x.device
    ref = rownorm_sq_ref(x.double())  # same rounded inputs, exact-enough accumulation
    assert_close_reduction(out, ref, n_reduce=shape[1])


@pytest.mark.parametrize("backend", _backends())
def test_rownorm_large_values_accumulate_in_fp32(backend):
    device = kernel_devices()[0]
    x = torch.full((2, 1024), 300.0, device=device, dtype=torch.bfloat16)  # x^2 overflows fp16
    out = dpkern.rownorm_sq(x, backend=backend)
    torch.testing.assert_close(out.cpu(), torch.full((2,), 1024 * 90000.0), rtol=1e-6, atol=0)


def test_auto_is_torch_on_cpu():
    assert dpkern.resolve_backend("auto", torch.device("cpu"), op="x") == "torch"


@pytest.mark.gpu
def test_auto_picks_a_kernel_on_gpu():
    assert dpkern.resolve_backend("auto", torch.device("cuda"), op="rownorm_sq") in ("triton", "cuda")


@pytest.mark.parametrize("bad,err,match", [
    (torch.ones(3, 4, dtype=torch.int32), TypeError, "float32, float16 or bfloat16"),
    (torch.ones(3), ValueError, "rank 2"),
    (torch.ones(2, 3, 4), ValueError, "rank 2"),
    ([[1.0, 2.0]], TypeError, "torch.Tensor"),
])
def test_rownorm_rejects_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        dpkern.rownorm_sq(bad, backend="torch")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        dpkern.rownorm_sq(torch.ones(2, 2), backend="cudnn")


def test_cuda_backend_on_cpu_tensor_says_why():
    # Either the extension/GPU is missing (RuntimeError naming which) or the tensor is on the CPU.
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        dpkern.rownorm_sq(torch.ones(2, 2), backend="cuda")
    if dpkern.cuda_available():
        with pytest.raises(ValueError, match="needs CUDA tensors; got a tensor on cpu"):
            dpkern.rownorm_sq(torch.ones(2, 2), backend="cuda")
    else:
        with pytest.raises(RuntimeError, match="without its CUDA extension|no CUDA GPU"):
            dpkern.rownorm_sq(torch.ones(2, 2), backend="cuda")


def test_poisoning_is_active():
    """The harness must poison dpkern's outputs, or the tests above could not catch unwritten elements."""
    from dpkern import _alloc
    assert torch.isnan(_alloc.empty(4, dtype=torch.float32, device="cpu")).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("device", kernel_devices())
def test_rownorm_many_equals_one_by_one(device, backend, dtype):
    """Tensors launched together (one N, contiguous, aligned) and those that are not (another N, a
    strided view, an empty one) give bit for bit what rownorm_sq gives each of them."""
    if backend == "cuda" and device != "cuda":
        pytest.skip("cuda backend needs a GPU")
    torch.manual_seed(3)
    xs = [torch.randn(b, n, device=device).to(dtype) for b, n in ((5, 63), (5, 63), (2, 63),
                                                                  (5, 40), (0, 63), (5, 63))]
    xs.append(torch.randn(5, 66, device=device).to(dtype)[:, 1:64])
    outs = dpkern.ops.rownorm.rownorm_sq_many(xs, backend=backend)
    assert len(outs) == len(xs)
    for x, o in zip(xs, outs):
        assert torch.equal(o, dpkern.rownorm_sq(x, backend=backend))
