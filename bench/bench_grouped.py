"""Grouped launches (kernels/_tables.py): the norms and the book-keeping of L layers of one layout
in one launch each, against L launches of the single-layer ops. The step of a small batch is
launch-bound (bench/gpu_busy.py), so the time of L single launches is mostly the host's."""
import pytest
import torch

from dpkern.ops.bookkeeping import bookkeeping_wgrad, bookkeeping_wgrad_grouped
from dpkern.ops.linear_norm import (linear_norm_flops, linear_norm_sq_grouped,
                                    linear_norm_sq_shared)
from bench import registry

CASES = registry.shapes("grouped_layers")
DTYPES = registry.torch_dtypes("grouped_layers")


def _layers(shape, dtype):
    n_layers, bsz, seq, d, p = shape
    dev = registry.DEVICE
    return [(torch.randn(bsz, seq, d, device=dev).to(dtype),
             [torch.randn(bsz, seq, p, device=dev).to(dtype) for _ in range(3)])
            for _ in range(n_layers)]


@pytest.mark.parametrize("launch", ["per-layer", "grouped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: registry.op("grouped_layers").shape_id(s))
def test_grouped_norms_bench(timed, shape, dtype, launch):
    """q/k/v-like groups (one input, three gradients) of L layers: ghost norms."""
    layers = _layers(shape, dtype)
    n_layers, bsz, seq, d, p = shape

    def per_layer():
        return [linear_norm_sq_shared(a, gs, method="ghost", backend="triton") for a, gs in layers]

    def grouped():
        return linear_norm_sq_grouped(layers, backend="triton")

    def check():  # not reported if wrong: the grouped launch gives the per-layer numbers
        # From T >= 256 a large grouped launch takes wider ghost tiles than one layer's launch
        # (ghost_norm_config, 2b630f3), so the two sum the same fp32 products in another order:
        # equal to ~1e-6 relative on these positive norms. A wrong layer or tile is off by O(1).
        for x, y in zip(grouped(), per_layer()):
            for u, v in zip(x, y):
                torch.testing.assert_close(u, v, rtol=1e-4, atol=0)
    flops = n_layers * bsz * (linear_norm_flops(seq, d, 0, "ghost")
                              + 3 * linear_norm_flops(seq, 0, p, "ghost"))
    info = timed(grouped if launch == "grouped" else per_layer, check=check, flops=flops)
    info.update(op="grouped_norms", backend=launch, dtype=str(dtype), shape=list(shape))


@pytest.mark.parametrize("launch", ["per-layer", "grouped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: registry.op("grouped_layers").shape_id(s))
def test_grouped_bookkeeping_bench(timed, shape, dtype, launch):
    """L layers' clipped weight gradients, each with its own per-sample factors."""
    n_layers, bsz, seq, d, p = shape
    layers = [(a, gs[0], torch.rand(bsz, device=registry.DEVICE)) for a, gs in _layers(shape, dtype)]

    def per_layer():
        return [bookkeeping_wgrad(a, g, s, backend="triton") for a, g, s in layers]

    def grouped():
        return bookkeeping_wgrad_grouped([(a, g, s, None, False) for a, g, s in layers],
                                         backend="triton")

    def check():  # not reported if wrong
        assert all(torch.equal(x, y) for x, y in zip(grouped(), per_layer()))
    info = timed(grouped if launch == "grouped" else per_layer, check=check,
                 flops=2 * n_layers * bsz * seq * d * p)
    info.update(op="grouped_bookkeeping", backend=launch, dtype=str(dtype), shape=list(shape))
