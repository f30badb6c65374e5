"""kernels/cholqr.py (one launch per CholeskyQR of a stack of blocks) against its torch reference,
dpkern.denoise.rsvd._cholqr: CPU interpreter here, full shapes on the GPU.

Tolerance policy: r is float64 on both sides, computed in another summation order: relative
1e-12 of max |r| (measured <= 2e-15 on well-conditioned blocks). q is rounded to y's dtype from
float64 values that differ by that much, so a float32 q equals the reference's or is one rounding
step away: 2 ulp of 1 (2.4e-7) absolute, since q's entries are at most 1 in size; float64 q 1e-12.
Rank-deficient blocks (rows < columns) carry the shift's ~1e-5 ||y|| directions, where both forms
agree only to cond(r) u64: those are checked for y = q r and orthonormality on the real part.
"""
import pytest
import torch

from dpkern.denoise import rsvd
from dpkern.denoise.rsvd import _cholqr, _cholqr_kernel, orthonormalize, shift_coef, small_svd
from tests.conftest import HAS_GPU

DEV = "cuda" if HAS_GPU else "cpu"


@pytest.fixture
def triton_backend(monkeypatch):
    """On the CPU the kernel runs only when asked for (interpreter)."""
    monkeypatch.setenv("DPKERN_BACKEND", "triton")


def _tol(dtype):
    return dict(rtol=0, atol=2.4e-7 if dtype == torch.float32 else 1e-12)


def _blocks(b, rows, l, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, rows, l, generator=g, dtype=torch.float64).to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("b, rows, l", [(1, 63, 24), (3, 200, 24), (2, 64, 1), (1, 40, 33),
                                        (2, 100, 64), (2, 24, 24)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("passes", [1, 2])
def test_kernel_equals_reference(triton_backend, dtype, b, rows, l, passes):
    y = _blocks(b, rows, l, dtype, seed=rows * l)
    assert _cholqr_kernel(y)
    q, r = rsvd._cholqr_launch(y, passes, None)
    if passes == 1:
        q_ref, r_ref = _cholqr(y)
    else:
        q1, r1 = _cholqr(y)
        q_ref, r2 = _cholqr(q1)
        r_ref = r2 @ r1
    assert q.dtype == dtype and r.dtype == torch.float64
    torch.testing.assert_close(r, r_ref, rtol=0, atol=1e-12 * float(r_ref.abs().max()))
    torch.testing.assert_close(q, q_ref, **_tol(dtype))


def test_transposed_input_and_padded_blocks(triton_backend):
    """A transposed (non-contiguous) y, per-block real rows (the rest of q written 0 and y's
    padding never read: it holds NaN here) and per-block real columns and coefficients: each
    block as the reference computes it alone."""
    b, rows, l = 3, 90, 20
    real_rows, real_cols = [90, 41, 7], [20, 13, 20]
    y = torch.full((b, l, rows), float("nan"), dtype=torch.float64, device=DEV).mT   # (b, rows, l)
    for i, (nr, nc) in enumerate(zip(real_rows, real_cols)):
        y[i, :nr] = 0.0
        y[i, :nr, :nc] = _blocks(1, nr, nc, torch.float64, seed=i)[0]
    coef = torch.tensor([shift_coef(nr, nc) for nr, nc in zip(real_rows, real_cols)],
                        dtype=torch.float64, device=DEV)
    rows_t = torch.tensor(real_rows, dtype=torch.int32, device=DEV)
    cols_t = torch.tensor(real_cols, dtype=torch.int32, device=DEV)
    q, r = rsvd._cholqr_launch(y, 2, coef, rows=rows_t, cols=cols_t)
    for i, (nr, nc) in enumerate(zip(real_rows, real_cols)):
        yi = y[i:i + 1, :nr, :nc]
        q1, r1 = _cholqr(yi, coef[i:i + 1])
        q2, r2 = _cholqr(q1, coef[i:i + 1])
        torch.testing.assert_close(q[i, :nr, :nc], q2[0], **_tol(torch.float64))
        assert (q[i, nr:] == 0).all() and (q[i, :, nc:] == 0).all()
        torch.testing.assert_close(r[i, :nc, :nc], (r2 @ r1)[0], rtol=0,
                                   atol=1e-12 * float(r1.abs().max()))


def test_rank_deficient_and_zero_blocks(triton_backend):
    y = torch.zeros(3, 50, 6, device=DEV)
    y[0] = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)).to(DEV)
    y[1, :, :2] = torch.randn(50, 2, generator=torch.Generator().manual_seed(1)).to(DEV)
    q, r = orthonormalize(y, "cholqr2")
    assert torch.isfinite(q).all() and torch.isfinite(r).all()
    torch.testing.assert_close(q @ r.float(), y, atol=1e-4, rtol=0)
    torch.testing.assert_close(q[0].mT @ q[0], torch.eye(6, device=DEV), atol=1e-5, rtol=0)
    assert (q[2] == 0).all()
    # fewer rows than columns: y = q r still holds
    y = _blocks(2, 5, 20, torch.float32, seed=3)
    q, r = orthonormalize(y, "cholqr2")
    torch.testing.assert_close(q.double() @ r, y.double(), atol=1e-5, rtol=0)


def test_nonfinite_block_gives_nonfinite_q(triton_backend):
    y = _blocks(2, 30, 8, torch.float32, seed=4)
    y[1, 3, 2] = float("inf")
    q, _ = orthonormalize(y, "cholqr2")
    assert torch.isfinite(q[0]).all() and not torch.isfinite(q[1]).all()


def test_small_svd_kernel_equals_torch(triton_backend, monkeypatch):
    """small_svd's 16 factorisations through the kernel, with padded blocks (coef, mask): the
    same w, t, z as the torch form."""
    l, real = 24, [24, 17]
    g = torch.Generator().manual_seed(5)
    r = torch.zeros(2, l, l, dtype=torch.float64)
    mask = torch.zeros(2, l, dtype=torch.float64)
    for i, n in enumerate(real):
        r[i, :n, :n] = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[1]
        mask[i, :n] = 1
    coef = torch.tensor([shift_coef(n, n) for n in real], dtype=torch.float64)
    r, mask, coef = r.to(DEV), mask.to(DEV), coef.to(DEV)
    out = small_svd(r, 8, coef=coef, mask=mask)
    monkeypatch.setenv("DPKERN_BACKEND", "torch")
    ref = small_svd(r, 8, coef=coef, mask=mask)
    for x, y in zip(out, ref):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10)


def test_dispatch():
    y = torch.zeros(2, 10, 4, device=DEV)
    assert not _cholqr_kernel(torch.zeros(0, 10, 4, device=DEV))           # B = 0: torch
    assert not _cholqr_kernel(torch.zeros(2, 10, 65, device=DEV))          # past MAX_L: torch
    assert not _cholqr_kernel(y.half())
    assert _cholqr_kernel(y) == HAS_GPU                                     # CPU: only if asked


@pytest.mark.gpu
def test_kernel_at_the_1b_stack_shapes():
    """The warm path's padded y_n buffer at the 1B model (154 blocks, 5504 rows, l = 24; the
    2048-row blocks padded), against the reference."""
    b, rows, l = 154, 5504, 24
    real = torch.tensor([2048] * 88 + [5504] * 66, dtype=torch.int32, device="cuda")
    y = torch.randn(b, rows, l, device="cuda")
    y[:88, 2048:] = 0
    coef = torch.tensor([shift_coef(int(n), l) for n in real], dtype=torch.float64, device="cuda")
    q, r = orthonormalize(y, "cholqr2", coef=coef, rows=real)
    q1, r1 = _cholqr(y, coef)
    q2, r2 = _cholqr(q1, coef)
    torch.testing.assert_close(q, q2, **_tol(torch.float32))
    torch.testing.assert_close(r, r2 @ r1, rtol=0, atol=1e-12 * float(r1.abs().max()))


def test_warm_call_through_the_kernel(monkeypatch):
    """A warm denoising call (2-layer Llama structure, 3 stacks) with every CholeskyQR in the
    kernel: 4 launches for the passes and 16 for the small SVD, no torch Cholesky, and the
    result of the torch form (same state, same sketches) to float32 rounding of the
    reconstruction."""
    from dpkern.denoise import RMTDenoiser
    from tests.denoise.test_batched_warm import SIGMA, _llama_like
    from tests.opcount import count_launches
    shapes = _llama_like(2, 32, 86)
    g = torch.Generator().manual_seed(6)
    grads = {}
    for k, (m, n) in shapes.items():
        u, v = torch.randn(m, 3, generator=g), torch.randn(n, 3, generator=g)
        grads[k] = (0.3 * SIGMA * (u @ v.T) + SIGMA * torch.randn(m, n, generator=g)).to(DEV)
    monkeypatch.setenv("DPKERN_BACKEND", "torch")
    den = RMTDenoiser(seed=0)
    for _ in range(2):                                           # cold, then warm
        den({k: v.clone() for k, v in grads.items()}, SIGMA)
    state = den.state_dict()
    ref = {k: v.clone() for k, v in grads.items()}
    den(ref, SIGMA)
    monkeypatch.setenv("DPKERN_BACKEND", "triton")
    den = RMTDenoiser(seed=0)
    den.load_state_dict(state)
    out = {k: v.clone() for k, v in grads.items()}
    with count_launches() as ops:
        den(out, SIGMA)
    assert den.last_stats["syncless"]
    assert ops.by_name["triton:_cholqr_fwd_kernel"] == 4 + 2 * 8
    assert "aten.linalg_cholesky_ex.default" not in ops.by_name
    for k in shapes:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-5 * float(ref[k].abs().max()))
