"""subspace_project (fused S_i = (g_i U)ᵀ (a_i V), ‖S_i‖²) vs a reference that forms every G_i."""
import pytest
import torch

from dpkern.subspace import orthonormalize, subspace_project
from dpkern.subspace.reference import per_sample_grads_ref, subspace_project_ref
from tests.conftest import HAS_GPU
from tests.tolerance import reduction_rtol

DEV = "cuda" if HAS_GPU else "cpu"
# (B, T, d, p, RU, RV)
SHAPES = [(3, 63, 60, 40, 5, 7), (1, 1, 16, 16, 16, 16), (2, 17, 33, 70, 20, 3),
          (0, 8, 24, 12, 4, 4), (2, 0, 8, 8, 2, 2), (1, 9, 70, 80, 66, 65)]
BACKENDS = ["torch", "triton"]


def _inputs(shape, dtype, seed=0):
    bsz, seq, d, p, ru, rv = shape
    g0 = torch.Generator().manual_seed(seed)
    a = torch.randn(bsz, seq, d, generator=g0).to(DEV, dtype)
    g = torch.randn(bsz, seq, p, generator=g0).to(DEV, dtype)
    u = orthonormalize(torch.randn(p, ru, generator=g0)).to(DEV)
    v = orthonormalize(torch.randn(d, rv, generator=g0)).to(DEV)
    return a, g, u, v


def _check(s, n, a, g, u, v, tf32=False):
    """Entry-wise: |S − S_ref| ≤ rtol · (|g||U|)ᵀ(|a||V|) (the no-cancellation size), rtol the fp32
    reduction policy plus, for TF32 dots, 4·2^-10 (operands of the three dots rounded to TF32);
    norms: against the fp64 sum of squares of the returned S (the kernel's own reduction)."""
    s_ref, _ = subspace_project_ref(a, g, u, v)
    size = torch.einsum("btr,bts->brs", g.double().abs() @ u.double().abs(),
                        a.double().abs() @ v.double().abs())
    n_red = a.shape[1] * (a.shape[2] + g.shape[2])
    assert torch.isfinite(s).all() and torch.isfinite(n).all()
    err = (s.double() - s_ref).abs()
    rtol = reduction_rtol(n_red) + (4 * 2.0 ** -10 if tf32 else 0.0)
    assert (err <= rtol * size + 1e-30).all(), float((err / size).max())
    own = s.double().square().sum(dim=(1, 2))
    torch.testing.assert_close(n.double(), own, rtol=reduction_rtol(s.shape[1] * s.shape[2]), atol=1e-30)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_d{}_p{}_r{}x{}".format(*s))
def test_matches_reference(shape, dtype, backend):
    a, g, u, v = _inputs(shape, dtype)
    s, n = subspace_project(a, g, u, v, backend=backend)
    assert s.shape == (shape[0], shape[4], shape[5]) and s.dtype == torch.float32
    assert n.shape == (shape[0],)
    if shape[1] == 0 and shape[0]:
        assert (s == 0).all() and (n == 0).all()
    # On a GPU the Triton kernel's fp32 dots default to TF32 (subspace_proj_config).
    _check(s, n, a, g, u, v, tf32=backend == "triton" and DEV == "cuda")


def test_split_and_strided_inputs():
    """n_split > 1 (one split empty), non-contiguous a / g / U."""
    from dpkern.kernels.subspace_proj import SubspaceProjConfig
    a, g, u, v = _inputs((2, 63, 60, 40, 5, 7), torch.float32, seed=3)
    a_t = a.transpose(1, 2).contiguous().transpose(1, 2)  # strides (T·d, 1, T)
    u_t = u.T.contiguous().T
    cfg = SubspaceProjConfig(BLOCK_T=16, BLOCK_K=32, n_split=3, num_warps=4, input_precision="ieee")
    s, n = subspace_project(a_t, g[:, :, :], u_t, v, backend="triton", config=cfg)
    _check(s, n, a, g, u, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_slices_of_one_buffer(backend):
    """out=: two layers write their (S, ‖S‖²) into slices of one poisoned buffer (the engine's
    per-rank groups): each slice equals that layer's own call, nothing else is written."""
    shapes = [(3, 63, 60, 40, 5, 7), (3, 63, 24, 33, 5, 7)]
    ins = [_inputs(sh, torch.float32, seed=k) for k, sh in enumerate(shapes)]
    s_all = torch.full((3, 3, 5, 7), float("nan"), device=DEV)
    n_all = torch.full((3, 3), float("nan"), device=DEV)
    for k, x in enumerate(ins):
        res = subspace_project(*x, backend=backend, out=(s_all[k], n_all[k]))
        assert res[0].data_ptr() == s_all[k].data_ptr()
        s, n = subspace_project(*x, backend=backend)
        assert torch.equal(s_all[k], s) and torch.equal(n_all[k], n)
    assert torch.isnan(s_all[2]).all() and torch.isnan(n_all[2]).all()


@pytest.mark.parametrize("bad,match", [
    (lambda s, n: (s[:, :2], n), "out S must be"),
    (lambda s, n: (s, n.double()), "out norms must be"),
    (lambda s, n: (s.transpose(1, 2).contiguous().transpose(1, 2), n), "contiguous"),
    (lambda s, n: s, "pair of tensors"),
])
def test_out_refused(bad, match):
    a, g, u, v = _inputs((2, 5, 6, 4, 3, 3), torch.float32)
    s, n = torch.zeros(2, 3, 3, device=DEV), torch.zeros(2, device=DEV)
    with pytest.raises((TypeError, ValueError), match=match):
        subspace_project(a, g, u, v, out=bad(s, n))
    assert (s == 0).all() and (n == 0).all()


def test_float64_inputs_exact():
    a, g, u, v = _inputs((2, 9, 12, 10, 3, 4), torch.float64)
    s, n = subspace_project(a, g, u.double(), v.double())
    s_ref, n_ref = subspace_project_ref(a, g, u, v)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(n, n_ref, rtol=1e-12, atol=0)


def test_full_rank_norm_equals_gradient_norm():
    """U, V square orthogonal: ‖S_i‖ = ‖G_i‖ (fp64 reference of the explicit gradient)."""
    a, g, _, _ = _inputs((3, 5, 6, 4, 4, 6), torch.float64)
    u = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0].to(DEV)
    v = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0].to(DEV)
    _, n = subspace_project(a, g, u, v)
    G = per_sample_grads_ref(a, g)
    torch.testing.assert_close(n, G.square().sum(dim=(1, 2)), rtol=1e-10, atol=0)


@pytest.mark.parametrize("bad,match", [
    (lambda a, g, u, v: (a[0], g, u, v), "a must have rank 3"),
    (lambda a, g, u, v: (a, g[:, :4], u, v), "agree on"),
    (lambda a, g, u, v: (a, g, u[1:], v), "u has"),
    (lambda a, g, u, v: (a, g, u, v[1:]), "v has"),
    (lambda a, g, u, v: (a, g, u.long(), v), "u must be a float"),
    (lambda a, g, u, v: (a, g, "u", v), "u must be a torch.Tensor"),
])
def test_bad_input(bad, match):
    a, g, u, v = _inputs((2, 5, 6, 4, 2, 2), torch.float32)
    with pytest.raises((TypeError, ValueError), match=match):
        subspace_project(*bad(a, g, u, v))


def test_float64_refused_by_named_triton():
    a, g, u, v = _inputs((2, 5, 6, 4, 2, 2), torch.float64)
    with pytest.raises(TypeError, match="float64"):
        subspace_project(a, g, u, v, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_full_size(dtype):
    """Llama-style shapes: B=8, T=512, d=2048, p=5632, r=64; tf32 dots (eps 2^-10)."""
    torch.manual_seed(0)
    a = torch.randn(8, 512, 2048, device="cuda").to(dtype)
    g = torch.randn(8, 512, 5632, device="cuda").to(dtype)
    u = orthonormalize(torch.randn(5632, 64, device="cuda"))
    v = orthonormalize(torch.randn(2048, 64, device="cuda"))
    s, n = subspace_project(a, g, u, v, backend="triton")
    torch.cuda.synchronize()
    _check(s, n, a, g, u, v, tf32=True)  # fp64 reference on the GPU (forms G_i: 0.7 GB)
