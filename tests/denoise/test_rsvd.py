"""Randomized (adaptive, batched) SVD against torch.linalg.svd in float64."""
import pytest
import torch

from dpkern.denoise.rsvd import adaptive_svd, exact_svd, orthonormalize, randomized_svd
from dpkern.denoise.shrinkers import bulk_edge
from tests.denoise.planted import planted

SIGMA = 0.01


def _proj(u):
    return u @ u.mT


@pytest.mark.parametrize("orth", ["cholqr2", "qr"])
@pytest.mark.parametrize("mn", [(300, 600), (63, 200), (128, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_randomized_matches_exact_on_retained(orth, mn):
    m, n = mn
    # Three well-separated outliers (y/edge >= 1.5 for these x): subspace iteration converges
    # geometrically at rate ~(edge / s_k)^2 per iteration, so 8 iterations reach ~1e-3 or better.
    _, a = planted(2, m, n, [6.0, 4.0, 3.0], SIGMA, seed=m, dtype=torch.float32)
    u, s, vh = randomized_svd(a, 3, oversample=8, n_iter=8, orth=orth,
                              generator=torch.Generator().manual_seed(0))
    ue, se, vhe = exact_svd(a.double(), 3)
    torch.testing.assert_close(s.double(), se, rtol=1e-4, atol=0)
    for j in range(2):  # subspaces, not vectors (signs are arbitrary)
        assert (_proj(u[j].double()) - _proj(ue[j])).norm() < 1e-2
        assert (_proj(vh[j].double().mT) - _proj(vhe[j].mT)).norm() < 1e-2
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close((u.mT @ u).double(), eye.expand(2, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close((vh @ vh.mT).double(), eye.expand(2, 3, 3), atol=1e-5, rtol=0)


def test_orthonormalize_rank_deficient_falls_back():
    y = torch.zeros(3, 50, 6)
    y[0] = torch.randn(50, 6)
    y[1, :, :2] = torch.randn(50, 2)          # rank 2 of 6: Gram is singular
    for orth in ("cholqr2", "qr"):
        q, r = orthonormalize(y, orth)
        assert torch.isfinite(q).all() and torch.isfinite(r).all()
        torch.testing.assert_close(q @ r.float(), y, atol=1e-4, rtol=0)
        torch.testing.assert_close(q[0].mT @ q[0], torch.eye(6), atol=1e-5, rtol=0)


def test_adaptive_grows_rank_until_below_threshold():
    m, n = 200, 400
    xs = [8.0 - 0.25 * i for i in range(20)]          # 20 strong components, all above the edge
    _, a = planted(1, m, n, xs, SIGMA, seed=3, dtype=torch.float32)
    thr = bulk_edge(m, n, SIGMA)
    (u, s, vh), = adaptive_svd(a, thr, rank=2, oversample=8, n_iter=6)   # 2 -> 4 -> ... -> 32
    se = exact_svd(a.double())[1][0]
    assert s.numel() == int((se > thr).sum()) == 20
    torch.testing.assert_close(s.double(), se[:20], rtol=1e-3, atol=0)
    assert (u.shape, vh.shape) == ((m, 20), (20, n))


def test_adaptive_pure_noise_and_small_matrices():
    thr = 1.3 * bulk_edge(40, 90, SIGMA)
    a = SIGMA * torch.randn(3, 40, 90, generator=torch.Generator().manual_seed(1))
    assert [t[1].numel() for t in adaptive_svd(a, thr)] == [0, 0, 0]
    # m <= rank + oversample: the exact SVD is used directly; everything kept at threshold 0
    _, b = planted(2, 5, 300, [5.0], SIGMA, seed=2, dtype=torch.float32)
    out = adaptive_svd(b, 0.0, rank=8)
    se = exact_svd(b.double())[1]
    for j in range(2):
        torch.testing.assert_close(out[j][1].double(), se[j], rtol=1e-5, atol=0)


def test_batched_equals_per_matrix():
    m, n = 96, 160
    _, a = planted(4, m, n, [5.0, 2.0, 1.2], SIGMA, seed=5, dtype=torch.float32)
    thr = bulk_edge(m, n, SIGMA)
    gens = lambda: [torch.Generator().manual_seed(100 + j) for j in range(4)]  # noqa: E731
    batched = adaptive_svd(a, thr, rank=1, generators=gens())
    g = gens()
    for j in range(4):
        (u, s, vh), = adaptive_svd(a[j:j + 1], thr, rank=1, generators=[g[j]])
        ub, sb, vhb = batched[j]
        assert s.shape == sb.shape
        torch.testing.assert_close(sb, s, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ub @ vhb, u @ vh, rtol=0, atol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (dict(a=torch.zeros(3, 4)), "rank 3"), (dict(a=torch.zeros(1, 9, 4)), "m <= n"),
    (dict(rank=0), "rank"), (dict(rank=6), "rank"), (dict(n_iter=-1), "n_iter"),
    (dict(omega=torch.zeros(1, 7, 2)), "omega")])
def test_bad_arguments(bad, match):
    args = dict(a=torch.randn(1, 5, 7), rank=2, oversample=2) | bad
    a, rank = args.pop("a"), args.pop("rank")
    with pytest.raises(ValueError, match=match):
        randomized_svd(a, rank, **args)


@pytest.mark.parametrize("rows", [24, 47, 49, 5504], ids=lambda r: f"rows{r}")
def test_cholqr2_tall_and_square_blocks_ill_conditioned(rows):
    """CholeskyQR2 on (b, rows, 24) blocks whose columns span 6 orders of magnitude: tall blocks
    (rows > 2 l) take the inverse-triangle GEMM, the others the triangular solve. Either way q is
    orthonormal to float32 rounding, spans y's range (Householder's q up to column signs) and
    y = q r."""
    l = 24
    g = torch.Generator().manual_seed(rows)
    basis = torch.linalg.qr(torch.randn(2, rows, l, generator=g, dtype=torch.float64))[0]
    mix = torch.linalg.qr(torch.randn(2, l, l, generator=g, dtype=torch.float64))[0]
    y = (basis * torch.logspace(0, -6, l, dtype=torch.float64)) @ mix           # cond 1e6
    q, r = orthonormalize(y.float(), "cholqr2")
    eye = torch.eye(l, dtype=torch.float64).expand(2, l, l)
    torch.testing.assert_close(q.double().mT @ q.double(), eye, atol=2e-5, rtol=0)
    torch.testing.assert_close(q.double() @ r, y.float().double(), atol=1e-5 * y.norm() / rows**0.5,
                               rtol=0)
    qh = torch.linalg.qr(y.float().double())[0]          # of the same (float32) input
    # q spans what Householder's q spans, including the smallest directions of y
    assert (q.double() @ q.double().mT - qh @ qh.mT).norm() < 1e-4 * l**0.5
