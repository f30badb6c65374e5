"""The B = 1 clip's passes over every gradient of a 1.0B-parameter set: the fp64 squared norms
(sumsq_many, one launch pair) and the in-place scale (scale_many_, one launch), against what the
engine ran before, per tensor: torch.linalg.vector_norm(dtype=float64) (which casts the whole
tensor to fp64 first) and mul_ + masked_fill_ (+ add_ into the earlier sums under gradient
accumulation, scale_many_(add_to=) in one pass). GB/s of the bytes that must move (fp32 read for
the norms; read + written for the scale; two read + one written for the scaled add) against the
copy bandwidth."""
import pytest
import torch

from bench import registry
from dpkern.ops.tensor_norms import scale_many_, sumsq_many
from dpkern.reference.tensor_norms import sumsq_ref

SHAPES = list(registry.shapes("tensor_sumsq")[0])
BACKENDS = ["triton", "torch_per_tensor"]


def _grads():
    torch.manual_seed(0)
    return [torch.randn(s, device=registry.DEVICE) for s in SHAPES]


def _norms_per_tensor(xs):  # the engine's B = 1 norms before sumsq_many
    return [torch.linalg.vector_norm(x, dtype=torch.float64).reshape(1) for x in xs]


def _scale_per_tensor(xs, sc, drop):  # ...and its scaling before scale_many_
    for x in xs:
        x.mul_(sc).masked_fill_(drop.view([1] * x.dim()), 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_sumsq_bench(timed, backend):
    xs = _grads()
    n = sum(x.numel() for x in xs)

    def check():  # not reported if wrong: each sum within 2n·2⁻⁵³ of the fp64 reference
        out = (sumsq_many(xs, backend="triton") if backend == "triton"
               else torch.cat(_norms_per_tensor(xs)).square())
        ref = torch.stack([sumsq_ref(x) for x in xs])
        lim = torch.tensor([2 * x.numel() * 2.0 ** -53 for x in xs], dtype=torch.float64,
                           device=ref.device) * ref
        assert bool(((out - ref).abs() <= lim + 1e-300).all())
    fn = ((lambda: sumsq_many(xs, backend="triton")) if backend == "triton"
          else (lambda: _norms_per_tensor(xs)))
    info = timed(fn, check=check, bytes_moved=4 * n)
    info.update(op="tensor_sumsq", backend=backend, dtype="float32", shape=[len(xs), n])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_scale_bench(timed, backend):
    xs = _grads()
    n = sum(x.numel() for x in xs)
    sc = torch.full((1,), 1.0, device=registry.DEVICE)  # repeated calls leave the values as they are
    keep = torch.ones(1, dtype=torch.bool, device=registry.DEVICE)

    def check():  # not reported if wrong: bit for bit the per-tensor multiply
        ys = [x.clone() for x in xs[:4]]
        zs = [x.clone() for x in xs[:4]]
        half = torch.full((1,), 0.5, device=registry.DEVICE)
        scale_many_(ys, half, keep, backend="triton")
        _scale_per_tensor(zs, half, ~keep)
        assert all(torch.equal(y, z) for y, z in zip(ys, zs))
    fn = ((lambda: scale_many_(xs, sc, keep, backend="triton")) if backend == "triton"
          else (lambda: _scale_per_tensor(xs, sc, ~keep)))
    info = timed(fn, check=check, bytes_moved=8 * n)
    info.update(op="tensor_scale", backend=backend, dtype="float32", shape=[len(xs), n])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_scale_add_bench(timed, backend):
    """A second backward before the step (gradient accumulation): scale into the earlier sums in
    one pass, against scaling in place then adding per tensor."""
    xs = _grads()
    ys = [torch.zeros_like(x) for x in xs]
    n = sum(x.numel() for x in xs)
    sc = torch.full((1,), 1.0, device=registry.DEVICE)
    keep = torch.ones(1, dtype=torch.bool, device=registry.DEVICE)

    def per_tensor():
        _scale_per_tensor(xs, sc, ~keep)
        torch._foreach_add_(ys, xs)

    def check():  # not reported if wrong: bit for bit mul then add
        half = torch.full((1,), 0.3, device=registry.DEVICE)
        a, b = [y.clone() for y in ys[:4]], [y.clone() for y in ys[:4]]
        scale_many_(xs[:4], half, keep, add_to=a, backend="triton")
        for y, x in zip(b, xs[:4]):
            y.add_(x * half)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    fn = ((lambda: scale_many_(xs, sc, keep, add_to=ys, backend="triton"))
          if backend == "triton" else per_tensor)
    info = timed(fn, check=check, bytes_moved=12 * n)
    info.update(op="tensor_scale_add", backend=backend, dtype="float32", shape=[len(xs), n])
