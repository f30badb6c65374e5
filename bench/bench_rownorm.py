"""rownorm_sq: each backend's GB/s next to the measured copy bandwidth."""
import pytest
import torch

import dpkern
from dpkern.reference.rownorm import rownorm_sq_ref
from bench import registry
from bench.conftest import HAS_GPU

CASES = registry.shapes("rownorm_sq")          # (B, N): per-sample gradient-norm-like shapes
DTYPES = registry.torch_dtypes("rownorm_sq")


def _backends():
    if not HAS_GPU:  # quick mode: the reference and the Triton kernel under TRITON_INTERPRET
        return ["torch", "triton"]
    return ["torch", "triton"] + (["cuda"] if dpkern.cuda_available() else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: f"B{s[0]}xN{s[1]}")
def test_rownorm_bench(timed, shape, dtype, backend):
    x = torch.randn(*shape, device=registry.DEVICE).to(dtype)

    def check():  # not reported if wrong
        out = dpkern.rownorm_sq(x, backend=backend)
        torch.testing.assert_close(out.double(), rownorm_sq_ref(x.double()), rtol=1e-4, atol=0)
    info = timed(lambda: dpkern.rownorm_sq(x, backend=backend), check=check,
                 bytes_moved=x.numel() * x.element_size() + shape[0] * 4)
    info.update(op="rownorm_sq", backend=backend, dtype=str(dtype), shape=list(shape))
