"""linear_norm_sq / linear_norm_sq_shared / bias_norm_sq: every backend and method against explicit
per-sample gradients in float64, awkward shapes, poisoned outputs, both fp32 and bf16 inputs."""
import pytest
import torch

from dpkern.ops._persample import fp32_mode, operand
from dpkern.ops.linear_norm import (bias_norm_sq, choose_method, linear_norm_sq,
                                    linear_norm_sq_shared)
from dpkern.reference.persample import bias_norm_sq_ref, linear_norm_sq_ref
from tests.conftest import HAS_GPU, kernel_devices
from tests.tolerance import assert_close_reduction

DTYPES = [torch.float32, torch.bfloat16]
# (B, T, d, p): B=0, B=1, T=1, T=63, d=60, a sequence over two 64-row tiles, p over two K-blocks
SHAPES = [(0, 5, 8, 8), (1, 1, 60, 17), (2, 63, 60, 33), (3, 17, 8, 130), (1, 130, 33, 70)]
GPU_SHAPES = SHAPES + [(8, 512, 2048, 2048), (2, 4096, 256, 512), (4, 1000, 4096, 1024)]


def seen(x):
    """x in float64 as the kernels multiply it in the default mode of its device (on a GPU fp32 is
    rounded to TF32, "tf32r"; tests/ops/test_tf32_sensitivity.py covers that mode on the CPU)."""
    return operand(x, fp32_mode(x.device), torch.float64)


def n_reduce(seq, d, p):
    """Longest chain of fp32 additions behind one norm (either method): T·(d+p) plus the T² plane."""
    return seq * (d + p) + seq * seq


def _inputs(shape, dtype, device, layout):
    b, t, d, p = shape
    if layout == "contiguous":
        return torch.randn(b, t, d, device=device).to(dtype), torch.randn(b, t, p, device=device).to(dtype)
    # feature dim not innermost for a, token dim sliced out of a wider buffer for g
    a = torch.randn(b, d, t, device=device).to(dtype).transpose(1, 2)
    g = torch.randn(b, t + 2, p, device=device).to(dtype)[:, 1:t + 1]
    return a, g


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("method", ["ghost", "instantiate", "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES if HAS_GPU else SHAPES,
                         ids=lambda s: "B{}xT{}xd{}xp{}".format(*s))
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("device", kernel_devices())
def test_linear_norm_matches_reference(device, backend, shape, dtype, method, layout):
    torch.manual_seed(hash((shape, str(dtype), method, layout)) % 2**31)
    a, g = _inputs(shape, dtype, device, layout)
    out = linear_norm_sq(a, g, method=method, backend=backend)
    assert out.shape == (shape[0],) and out.dtype == torch.float32 and out.device == a.device
    ref = linear_norm_sq_ref(seen(a), seen(g))  # same rounded inputs, float64 sums
    assert_close_reduction(out, ref, n_reduce=n_reduce(*shape[1:]))


@pytest.mark.parametrize("method", ["ghost", "instantiate"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_shared_input_group(backend, method):
    """q/k/v-like group: 4 gradients (more than one kernel launch's group), mixed widths and dtypes."""
    device = kernel_devices()[0]
    torch.manual_seed(7)
    bsz, seq, d = 3, 63, 60
    a = torch.randn(bsz, seq, d, device=device).to(torch.bfloat16)
    gs = [torch.randn(bsz, seq, p, device=device).to(dt)
          for p, dt in ((60, torch.bfloat16), (20, torch.bfloat16), (20, torch.float32), (7, torch.bfloat16))]
    outs = linear_norm_sq_shared(a, gs, method=method, backend=backend)
    assert len(outs) == len(gs)
    for out, g in zip(outs, gs):
        ref = linear_norm_sq_ref(seen(a), seen(g))
        assert_close_reduction(out, ref, n_reduce=n_reduce(seq, d, g.shape[2]))


@pytest.mark.parametrize("block", [16, 32])
def test_ghost_kernel_many_tile_pairs(block):
    """Small tiles give many (t, s) tile pairs at a CPU-sized T: exercises the symmetric weighting."""
    from dpkern import _alloc
    from dpkern.kernels.ghost_norm import GhostNormConfig, ghost_norm_fwd
    from dpkern.kernels.instantiate_norm import InstantiateNormConfig, instantiate_norm_fwd
    device = kernel_devices()[0]
    torch.manual_seed(block)
    a, g = torch.randn(2, 63, 20, device=device), torch.randn(2, 63, 24, device=device)
    ref = linear_norm_sq_ref(seen(a), seen(g))
    out = _alloc.empty(2, dtype=torch.float32, device=device)
    mode = fp32_mode(device)  # the launchers take the mode the ops would resolve
    ghost_norm_fwd(a, [g], [out], GhostNormConfig(block, 16, 4, 2), empty=_alloc.empty,
                   fp32_mode=mode)
    assert_close_reduction(out, ref, n_reduce=n_reduce(63, 20, 24))
    out = _alloc.empty(2, dtype=torch.float32, device=device)
    instantiate_norm_fwd(a, g, out, InstantiateNormConfig(block, 16, 16, 4, 2), empty=_alloc.empty,
                         fp32_mode=mode)
    assert_close_reduction(out, ref, n_reduce=n_reduce(63, 20, 24))


def test_ghost_config_heuristic():
    """128-row tiles only where the launch has programs enough for them (grouped launches over a
    model's layers); the measured choice of bench/results/norm_probe_h100_2b630f3."""
    from dpkern.kernels.ghost_norm import ghost_norm_config
    assert ghost_norm_config(512, 8, 16).BLOCK_T == 128            # 10 pairs x 8 x 16 programs
    assert ghost_norm_config(256, 16, 16).BLOCK_T == 128
    assert ghost_norm_config(512, 8, 1).BLOCK_T == 64              # one layer: 80 programs
    assert ghost_norm_config(128, 32, 16).BLOCK_T == 64            # one 128-row tile per sample
    assert ghost_norm_config(512, 8, 16, fp32=True).num_stages == 3  # fp32 tiles: shared memory
    assert ghost_norm_config(2048, 1, 1).BLOCK_T == 128


def test_ghost_grouped_wide_tiles_awkward_t():
    """The grouped launch with the 128 x 64 tiles the heuristic picks for long grouped launches,
    at a T that leaves a ragged last tile, against the reference, into poisoned outputs."""
    from dpkern import _alloc
    from dpkern.kernels.ghost_norm import GhostNormConfig, ghost_norm_grouped_fwd
    device = kernel_devices()[0]
    torch.manual_seed(3)
    as_ = [torch.randn(2, 131, 24, device=device).to(torch.bfloat16) for _ in range(3)]
    gss = [[torch.randn(2, 131, p, device=device).to(torch.bfloat16) for p in (20, 8)]
           for _ in range(3)]
    out = torch.full((3, 2, 2), float("nan"), device=device)
    ghost_norm_grouped_fwd(as_, gss, out, GhostNormConfig(128, 64, 8, 4), empty=_alloc.empty,
                           fp32_mode=fp32_mode(device))
    for l in range(3):
        for k, g in enumerate(gss[l]):
            ref = linear_norm_sq_ref(seen(as_[l]), seen(g))
            assert_close_reduction(out[l, k], ref, n_reduce=n_reduce(131, 24, g.shape[2]))


def test_method_choice_follows_flop_model():
    assert choose_method(512, 2048, 2048) == "ghost"  # T(d+p)/2 = 1M < dp = 4M
    assert choose_method(4096, 256, 256) == "instantiate"
    assert choose_method(4096, 256, 256, backend="torch") == "instantiate"
    assert choose_method(1024, 2048, 256, backend="torch") == "instantiate"  # 2.3M > 0.5M
    # sharing the input Gram across q/k/v makes ghost win where one layer alone would not
    assert choose_method(640, 1024, [1024] * 3, backend="torch") == "ghost"
    assert choose_method(640, 1024, 1024, backend="torch") == "instantiate"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_norm(dtype):
    torch.manual_seed(3)
    g = torch.randn(3, 63, 60).to(dtype)
    assert_close_reduction(bias_norm_sq(g), bias_norm_sq_ref(g.double()), n_reduce=63 * 60)
    assert bias_norm_sq(torch.randn(0, 4, 5)).shape == (0,)


def test_empty_sequence_gives_zero_norms():
    dev = kernel_devices()[0]  # the GPU run failed here on CPU tensors with backend="triton"
    for backend in ("torch", "triton"):
        out = linear_norm_sq(torch.randn(3, 0, 4, device=dev), torch.randn(3, 0, 5, device=dev),
                             backend=backend)
        assert torch.equal(out, torch.zeros(3, device=dev))


@pytest.mark.parametrize("a,g,kw,err,match", [
    (torch.ones(2, 3), torch.ones(2, 3, 4), {}, ValueError, "a must have rank 3"),
    (torch.ones(2, 3, 4, dtype=torch.int32), torch.ones(2, 3, 4), {}, TypeError, "a must be one of"),
    (torch.ones(2, 3, 4), torch.ones(2, 4, 4), {}, ValueError, "batch and sequence sizes"),
    (torch.ones(2, 3, 4), torch.ones(2, 3, 4), {"method": "exact"}, ValueError, "method must be"),
    (torch.ones(2, 3, 4), [[1.0]], {}, TypeError, "g must be a torch.Tensor"),
])
def test_linear_norm_rejects_bad_input(a, g, kw, err, match):
    with pytest.raises(err, match=match):
        linear_norm_sq(a, g, backend="torch", **kw)


def test_shared_rejects_empty_group():
    with pytest.raises(TypeError, match="gs must be a non-empty list"):
        linear_norm_sq_shared(torch.ones(2, 3, 4), [], backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("fp32_dot", ["ieee", "tf32x3", "tf32", "tf32r"])
def test_norm_kernels_fp32_precision(fp32_dot):
    """fp32 inputs whose products TF32 would round: ieee and tf32x3 must match float64 to fp32
    accuracy; plain TF32 must not (so this test can tell them apart); tf32r (the GPU default) must
    match float64 of the TF32-rounded operands, which book-keeping sums."""
    from dpkern.kernels.ghost_norm import GhostNormConfig, ghost_norm_fwd
    from dpkern.kernels.instantiate_norm import InstantiateNormConfig, instantiate_norm_fwd
    torch.manual_seed(0)
    a = 1 + torch.rand(4, 256, 512, device="cuda") * 2**-12
    g = 1 - torch.rand(4, 256, 512, device="cuda") * 2**-12
    ref = linear_norm_sq_ref(a.double(), g.double())
    if fp32_dot == "tf32r":
        ref = linear_norm_sq_ref(operand(a, "tf32r", torch.float64),
                                 operand(g, "tf32r", torch.float64))
    outs = [torch.empty(4, device="cuda") for _ in range(2)]
    ghost_norm_fwd(a, [g], [outs[0]], GhostNormConfig(64, 64, 4, 3, fp32_dot))
    instantiate_norm_fwd(a, g, outs[1], InstantiateNormConfig(64, 64, 32, 4, 3, fp32_dot))
    for out in outs:
        rel = ((out.double() - ref).abs() / ref).max().item()
        if fp32_dot == "tf32":  # a rounds to exactly 1: a systematic under-estimate of ~2.4e-4
            assert rel > 1e-4
        else:  # all terms positive: fp32 error ~1e-6, far below TF32's (the sqrt(n) policy is looser)
            assert rel < 2e-5, rel
