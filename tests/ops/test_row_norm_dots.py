"""row_norm_dots: Σ_t ‖a_bt‖·‖g_kbt‖ for every backend against the fp64 reference, within the
relative error that dpkern/layers/bounds.py inflates it by (so the bound stays an upper bound),
on awkward shapes and layouts, with poisoned outputs; bad input refused."""
import math

import pytest
import torch

from dpkern.layers.bounds import _gamma
from dpkern.ops.rownorm import row_norm_dots
from dpkern.reference.rownorm import row_norm_dots_ref
from tests.conftest import HAS_GPU, kernel_devices

SHAPES = [(1, 1, 1, [1]), (1, 63, 60, [17]), (3, 63, 60, [60, 5, 33]), (2, 5, 130, [7, 300, 9, 4]),
          (4, 17, 8, [8, 8])]
GPU_SHAPES = SHAPES + [(8, 512, 2048, [2048, 512, 512]), (1, 4096, 2048, [5632])]


def _inputs(bsz, seq, d, ps, dtype, device, layout):
    torch.manual_seed(0)
    scale = torch.logspace(-3, 3, bsz).view(-1, 1, 1)  # dynamic range across samples
    if layout == "transposed":  # T-contiguous views
        a = (torch.randn(bsz, d, seq) * scale).to(dtype).to(device).transpose(1, 2)
    else:
        a = (torch.randn(bsz, seq, d + 3) * scale).to(dtype).to(device)[:, :, 2:d + 2]
    gs = [(torch.randn(bsz, seq, p) * scale.flip(0)).to(dtype).to(device) for p in ps]
    return a, gs


@pytest.mark.parametrize("layout", ["offset", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES if HAS_GPU else SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device", kernel_devices())
def test_matches_reference_within_the_bound_inflation(device, backend, shape, dtype, layout):
    bsz, seq, d, ps = shape
    a, gs = _inputs(bsz, seq, d, ps, dtype, device, layout)
    got = row_norm_dots(a, gs, backend=backend)
    assert got.shape == (len(ps), bsz) and got.dtype == torch.float64
    want = row_norm_dots_ref(a, gs)
    for k, p in enumerate(ps):
        # bounds.py multiplies by (1 + γ(d + p + 6)): the computed sum may be below the exact one
        # by at most that factor (and is not above it by more, or the op computes something else)
        rel = _gamma(d + p + 6)
        assert torch.all(got[k] * (1 + rel) >= want[k]), (k, got[k], want[k])
        assert torch.all(got[k] <= want[k] * (1 + rel)), (k, got[k], want[k])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device", kernel_devices())
def test_empty_batch_or_sequence(device, backend):
    for bsz, seq in [(0, 5), (3, 0)]:
        out = row_norm_dots(torch.ones(bsz, seq, 4, device=device),
                            [torch.ones(bsz, seq, 2, device=device)], backend=backend)
        assert out.shape == (1, bsz) and torch.all(out == 0)


def test_nonfinite_rows_propagate():
    """A non-finite row gives a non-finite sum: the engine then drops the sample (bound = inf)."""
    a, gs = _inputs(2, 9, 6, [5], torch.float32, kernel_devices()[0], "offset")
    gs[0][1, 3, 2] = math.inf
    out = row_norm_dots(a, gs, backend="triton")
    assert torch.isfinite(out[0, 0]) and not torch.isfinite(out[0, 1])


@pytest.mark.parametrize("bad, match", [
    (lambda a, g: (a, []), "non-empty"),
    (lambda a, g: (a[0], [g]), "rank 3"),
    (lambda a, g: (a, [g[:, :2]]), "sequence sizes"),
    (lambda a, g: (a.long(), [g]), "float32"),
])
def test_bad_input_is_refused(bad, match):
    a, g = torch.ones(2, 3, 4), torch.ones(2, 3, 5)
    with pytest.raises((TypeError, ValueError), match=match):
        row_norm_dots(*bad(a, g))
