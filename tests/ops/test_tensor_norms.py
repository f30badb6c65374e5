"""sumsq_many / scale_many_: the Triton passes against the reference on awkward sizes (chunk edges,
one element, empty tensors, odd layouts that take the reference), the written error bound of the
fp64 sums, NaN / Inf handling, one launch pair for all tensors, poisoned outputs."""
import math

import pytest
import torch

import dpkern.kernels.tensor_norms as K
from dpkern.ops.tensor_norms import scale_many_, sumsq_many
from dpkern.reference.tensor_norms import scale_ref_, sumsq_ref
from tests.conftest import HAS_GPU, kernel_devices
from tests.opcount import count_launches

U64 = 2.0 ** -53  # fp64 unit roundoff


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 256 elements in steps of 64 on the CPU (the interpreter is slow): the same code
    paths (tensors over several chunks, partial last chunks) at sizes it can run."""
    if not HAS_GPU:
        monkeypatch.setattr(K, "CHUNK", 256)
        monkeypatch.setattr(K, "BLOCK", 64)
        monkeypatch.setattr(K, "FINISH_BLOCK", 4)
    return K.CHUNK


def _sizes(chunk):
    """Element counts around the chunk edges, plus 1, 63 and a tensor of many chunks."""
    return [1, 63, chunk - 1, chunk, chunk + 1, 2 * chunk + 5, 9 * chunk + 3, 60]


def _tensors(sizes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # spread magnitudes so the relative bound is tested on sums of unlike terms
    return [(torch.randn(n, generator=g) * torch.logspace(-3, 3, n)).to(device) for n in sizes]


def _exact_sumsq(x: torch.Tensor) -> float:
    """Σ x² correctly rounded to fp64 (fp32 squares are exact in fp64; fsum rounds once)."""
    return math.fsum(v * v for v in x.double().flatten().tolist())


@pytest.mark.parametrize("device", kernel_devices())
def test_sumsq_matches_exact_sum_within_written_bound(device, small_chunks):
    xs = _tensors(_sizes(small_chunks), device)
    xs[2] = xs[2].reshape(-1, 1)  # shapes do not matter, only the elements
    out = sumsq_many(xs, backend="triton")
    assert out.shape == (len(xs),) and out.dtype == torch.float64 and out.device == xs[0].device
    for k, x in enumerate(xs):
        exact, n = _exact_sumsq(x), x.numel()
        # any summation order of n exact terms: |s - Σ| ≤ (n - 1)·u·Σ (+ u for fsum's rounding)
        assert abs(float(out[k]) - exact) <= n * U64 * exact, (k, n)
        # the engine's bound on the norm from the result: ‖x‖ ≤ √s (1 + (n + 2)·2⁻⁵²)
        assert math.sqrt(exact) <= math.sqrt(float(out[k])) * (1 + (n + 2) * 2.0 ** -52)


@pytest.mark.parametrize("device", kernel_devices())
def test_sumsq_launches_once_and_is_deterministic(device, small_chunks):
    xs = _tensors(_sizes(small_chunks), device, seed=1)
    with count_launches() as c:
        a = sumsq_many(xs, backend="triton")
    assert c.by_name["triton:_sumsq_chunks_kernel"] == 1, c.by_name
    assert c.by_name["triton:_sumsq_finish_kernel"] == 1, c.by_name
    assert c.triton == 2
    b = sumsq_many(xs, backend="triton")
    assert torch.equal(a, b)  # fixed order: the same bits every call


@pytest.mark.parametrize("device", kernel_devices())
def test_sumsq_takes_other_tensors_through_the_reference(device, small_chunks):
    """fp64, empty, non-contiguous and unaligned tensors beside launchable ones: each sum is the
    reference's (or the kernel's, within the bound), in the input order."""
    base = _tensors([small_chunks + 7, 40, 33], device, seed=2)
    xs = [base[0], base[1].double(), torch.empty(0, device=device),
          torch.randn(9, 7, device=device).t(), base[2][1:], base[1]]
    out = sumsq_many(xs, backend="triton")
    for k, x in enumerate(xs):
        exact = _exact_sumsq(x)
        assert abs(float(out[k]) - exact) <= max(x.numel(), 1) * 2 * U64 * exact, k
    assert float(out[2]) == 0.0
    assert torch.equal(out[[1, 3, 4]].cpu(), torch.stack([sumsq_ref(xs[k]) for k in (1, 3, 4)]).cpu())


@pytest.mark.parametrize("device", kernel_devices())
def test_sumsq_propagates_nonfinite_to_its_tensor_only(device, small_chunks):
    xs = _tensors([small_chunks * 2 + 1, 50, 70], device, seed=3)
    xs[0][small_chunks + 3] = float("inf")
    xs[2][5] = float("nan")
    out = sumsq_many(xs, backend="triton").cpu()
    assert math.isinf(out[0]) and math.isnan(out[2])
    assert math.isfinite(out[1]) and out[1] > 0


def test_sumsq_torch_backend_and_empty_list():
    xs = _tensors([5, 300], "cpu", seed=4)
    assert torch.equal(sumsq_many(xs, backend="torch"), torch.stack([sumsq_ref(x) for x in xs]))
    assert sumsq_many([]).shape == (0,)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["one_scale", "per_tensor"])
@pytest.mark.parametrize("device", kernel_devices())
def test_scale_many_is_the_fp32_multiply(device, small_chunks, per_tensor):
    """Kept: bit for bit x·scale_k (one fp32 rounding, as x.mul_(scale)), on every element."""
    xs = _tensors(_sizes(small_chunks) + [5], device, seed=5)
    xs[-1] = xs[-1].double()  # through the reference, beside the launch
    scale = (torch.rand(len(xs) if per_tensor else 1) + 0.01).to(device)
    want = [scale_ref_(x.clone(), scale[k:k + 1] if per_tensor else scale, torch.ones(
        1, dtype=torch.bool, device=device)) for k, x in enumerate(xs)]
    with count_launches() as c:
        scale_many_(xs, scale, torch.ones(1, dtype=torch.bool, device=device), backend="triton")
    assert c.by_name["triton:_scale_chunks_kernel"] == 1, c.by_name
    for k, (x, w) in enumerate(zip(xs, want)):
        assert torch.equal(x, w), k


@pytest.mark.parametrize("device", kernel_devices())
def test_scale_many_dropped_sample_gives_exact_zeros(device, small_chunks):
    xs = _tensors([small_chunks * 3 + 2, 17], device, seed=6)
    xs[0][7], xs[0][small_chunks + 1], xs[1][3] = float("nan"), float("inf"), float("-inf")
    scale_many_(xs, torch.full((1,), 0.5, device=device),
                torch.zeros(1, dtype=torch.bool, device=device), backend="triton")
    for x in xs:
        assert torch.equal(x, torch.zeros_like(x))
        assert not torch.signbit(x).any()  # +0.0, as masked_fill gives


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("device", kernel_devices())
def test_scale_many_add_to_is_mul_then_add(device, small_chunks, keep):
    """add_to: y_k ← y_k + fl(x_k·scale_k) (or + 0 for a dropped sample), bit for bit torch's
    mul then add_, on every element; xs are left as they are. A float64 sum takes the reference
    beside the launch."""
    xs = _tensors(_sizes(small_chunks), device, seed=8)
    xs[1][5] = float("nan")  # a dropped sample's NaN must not reach the sums
    ys = [t * 3.0 for t in _tensors(_sizes(small_chunks), device, seed=9)]
    ys[-1] = ys[-1].double()
    scale = (torch.rand(len(xs)) + 0.01).to(device)
    k_t = torch.full((1,), keep, dtype=torch.bool, device=device)
    want = [y.clone().add_(scale_ref_(x.clone(), scale[k:k + 1], k_t).to(y.dtype))
            for k, (x, y) in enumerate(zip(xs, ys))]
    before = [x.clone() for x in xs]
    with count_launches() as c:
        scale_many_(xs, scale, k_t, add_to=ys, backend="triton")
    assert c.by_name["triton:_scale_chunks_kernel"] == 1, c.by_name
    for y, w in zip(ys, want):  # bit for bit; NaN where a kept sample had one
        torch.testing.assert_close(y, w, rtol=0, atol=0, equal_nan=True)
    for x, b in zip(xs, before):
        torch.testing.assert_close(x, b, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(ys[1]).any() == keep


def test_scale_many_refuses_bad_arguments():
    x = torch.ones(4)
    keep = torch.ones(1, dtype=torch.bool)
    with pytest.raises(ValueError, match="scale must be a float32 tensor of shape"):
        scale_many_([x, x], torch.ones(3), keep)
    with pytest.raises(ValueError, match="scale must be a float32"):
        scale_many_([x], torch.ones(1, dtype=torch.float64), keep)
    with pytest.raises(ValueError, match="keep must be a"):
        scale_many_([x], torch.ones(1), torch.ones(1))
    with pytest.raises(TypeError, match=r"xs\[1\] must be float32 or float64"):
        sumsq_many([x, x.bfloat16()])
    with pytest.raises(TypeError, match="list of tensors"):
        sumsq_many(x)
    with pytest.raises(ValueError, match=r"add_to\[0\] has shape \(5,\), xs\[0\] \(4,\)"):
        scale_many_([x], torch.ones(1), keep, add_to=[torch.zeros(5)])
    with pytest.raises(ValueError, match="add_to must hold 1 tensors"):
        scale_many_([x], torch.ones(1), keep, add_to=[])
    assert torch.equal(x, torch.ones(4))  # nothing written on refusal


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_sumsq_and_scale_at_model_size():
    """The default chunking on a 1B-like set of gradients (lm_head 32000 × 2048 among them)."""
    shapes = [(32000, 2048), (2048, 2048), (5632, 2048), (2048,), (2048, 5632), (1, 3)]
    g = torch.Generator(device="cuda").manual_seed(7)
    xs = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    out = sumsq_many(xs, backend="triton")
    for k, x in enumerate(xs):
        ref = float(sumsq_ref(x))  # fp64, another order: both within n·u of the exact sum
        assert abs(float(out[k]) - ref) <= 2 * x.numel() * U64 * ref, k
    keep = torch.ones(1, dtype=torch.bool, device="cuda")
    sc = torch.full((1,), 0.3, device="cuda")  # not a power of two: the products round
    ys = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    want_y = [y + x * sc for x, y in zip(xs, ys)]  # two roundings: a fused multiply-add differs
    scale_many_(xs, sc, keep, add_to=ys, backend="triton")
    assert all(torch.equal(y, w) for y, w in zip(ys, want_y))
    want = [x * sc for x in xs]
    scale_many_(xs, sc, keep, backend="triton")
    assert all(torch.equal(x, w) for x, w in zip(xs, want))


def test_whole_chunks_read_and_write_16_bytes_wide():
    """Compiled for sm_90 (no GPU needed): the whole-chunk loops load (and the scale stores) fp32
    four at a time. Masked by the tensor's end they would be scalar: the last, partial chunk
    alone takes the masked loop."""
    from tests.sm90_ptx import tabled_load_counts
    got = tabled_load_counts(["tensor_sumsq", "tensor_scale", "tensor_scale_acc"])
    assert got["tensor_sumsq"]["table"].get("ld.v4.b32", 0) >= 1, got
    for name, loads in (("tensor_scale", 1), ("tensor_scale_acc", 2)):  # x (and the sums)
        assert got[name]["table"].get("ld.v4.b32", 0) >= loads, got
        assert got[name]["table"].get("st.v4.b32", 0) >= 1, got
