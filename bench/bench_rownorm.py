"""rownorm_sq: each backend's GB/s next to the measured copy bandwidth."""
import pytest
import torch

import dpkern
from dpkern.reference.rownorm import rownorm_sq_ref
from bench.conftest import HAS_GPU

# (B, N): per-sample gradient-norm-like shapes.
CASES = [(64, 1 << 20), (4096, 4096), (16384, 1024)] if HAS_GPU else [(8, 512)]
DTYPES = [torch.float32, torch.bfloat16]


def _backends():
    if not HAS_GPU:
        return ["torch"]
    return ["torch", "triton"] + (["cuda"] if dpkern.cuda_available() else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: f"B{s[0]}xN{s[1]}")
def test_rownorm_bench(timed, shape, dtype, backend):
    dev = "cuda" if HAS_GPU else "cpu"
    x = torch.randn(*shape, device=dev).to(dtype)
    out = dpkern.rownorm_sq(x, backend=backend)
    ref = rownorm_sq_ref(x.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=0)  # not reported if wrong
    info = timed(lambda: dpkern.rownorm_sq(x, backend=backend),
                 bytes_moved=x.numel() * x.element_size() + shape[0] * 4)
    info.update(op="rownorm_sq", backend=backend, dtype=str(dtype), shape=list(shape))
