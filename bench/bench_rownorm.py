"""rownorm_sq and row_norm_dots: each backend's GB/s next to the measured copy bandwidth."""
import pytest
import torch

import dpkern
from dpkern.ops.rownorm import row_norm_dots
from dpkern.reference.rownorm import row_norm_dots_ref, rownorm_sq_ref
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", registry.torch_dtypes("row_norm_dots"), ids=str)
@pytest.mark.parametrize("shape", registry.shapes("row_norm_dots"),
                         ids=lambda s: registry.op("row_norm_dots").shape_id(s))
def test_row_norm_dots_bench(timed, shape, dtype, backend):
    """Three outputs sharing one input (q/k/v): one launch on triton, ~10 ops on torch."""
    bsz, seq, d, p = shape
    a = torch.randn(bsz, seq, d, device=registry.DEVICE).to(dtype)
    gs = [torch.randn(bsz, seq, p, device=registry.DEVICE).to(dtype) for _ in range(3)]

    def check():  # not reported if wrong
        torch.testing.assert_close(row_norm_dots(a, gs, backend=backend),
                                   row_norm_dots_ref(a, gs), rtol=1e-4, atol=0)
    info = timed(lambda: row_norm_dots(a, gs, backend=backend), check=check,
                 bytes_moved=(a.numel() + sum(g.numel() for g in gs)) * a.element_size())
    info.update(op="row_norm_dots", backend=backend, dtype=str(dtype), shape=list(shape))
