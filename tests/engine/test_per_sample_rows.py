"""PerSampleRows / scaled_row_sums: the norm weights' and biases' (one fp32 per-sample use each)
bound terms and book-keeping per width.

The sums are compared with a float64 reference under a written bound (fp32 products and a length-B
sum: |error| ≤ γ(B + 1) Σ_i |s_i g_i| elementwise), non-finite samples give exact zeros, the fp64
norms equal the per-parameter _sqrt_q ones bit for bit, and on the GPU the sums stay fp32 with TF32
matmuls allowed (a matmul would round to 10 bits: ~1e-3 relative)."""
import math

import pytest
import torch

from dpkern.layers.bounds import _sqrt_q, release_bounds
from dpkern.layers.uses import (LinearUse, PerSampleRows, PerSampleUse, bookkeep, norms_sq,
                                scaled_row_sums, stacked)

U = 2.0 ** -24


def _gamma(n):
    return n * U / (1 - n * U)


def _check_sums(got, g, s, keep=None):
    """got (L, n) against float64 Σ_i s_i g_i (rows with keep False left out)."""
    g64, s64 = g.double(), s.double().unsqueeze(2)
    if keep is not None:
        k = keep.view(1, -1, 1)
        g64 = torch.where(k, g64, 0.0)
        s64 = torch.where(k, s64, 0.0)
    ref = (g64 * s64).sum(dim=1)
    tol = _gamma(g.shape[1] + 1) * (g64 * s64).abs().sum(dim=1)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.all((got.double() - ref).abs() <= tol), (got.double() - ref).abs().max()


@pytest.mark.parametrize("bsz", [1, 3, 64])
def test_scaled_row_sums_against_float64(bsz):
    gen = torch.Generator().manual_seed(bsz)
    g = torch.randn(5, bsz, 63, generator=gen) * torch.logspace(-3, 3, 63)
    s = torch.rand(5, bsz, generator=gen)
    _check_sums(scaled_row_sums(g, s), g, s)


def test_non_finite_samples_give_exact_zeros():
    g = torch.randn(3, 4, 7)
    g[1, 2, 3] = float("nan")
    g[0, 2, 0] = float("inf")
    s = torch.rand(3, 4)
    s[:, 2] = 0.0
    keep = torch.tensor([True, True, False, True])
    got = scaled_row_sums(g, s, keep)
    assert torch.isfinite(got).all()
    _check_sums(got, torch.where(keep.view(1, -1, 1), g, 0.0), s, keep)
    assert torch.isnan(scaled_row_sums(g, s)).any()  # without keep: 0·NaN, as documented


def test_stacked_views_one_factor():
    c = torch.rand(4)
    x = stacked([c, c, c])
    assert x.shape == (3, 4) and x.data_ptr() == c.data_ptr()
    y = stacked([c, torch.rand(4)])
    assert torch.equal(y[0], c)


def _uses(bsz=6):
    gen = torch.Generator().manual_seed(0)
    w = [torch.nn.Parameter(torch.ones(n)) for n in (8, 8, 5, 8)]
    lin = torch.nn.Parameter(torch.ones(3, 4))
    f64 = torch.nn.Parameter(torch.ones(8, dtype=torch.float64))
    uses = {p: [PerSampleUse(torch.randn(bsz, *p.shape, generator=gen), f"w{k}")]
            for k, p in enumerate(w)}
    uses[lin] = [LinearUse(torch.randn(bsz, 2, 4, generator=gen),
                           torch.randn(bsz, 2, 3, generator=gen), "lin")]
    uses[f64] = [PerSampleUse(torch.randn(bsz, 8, generator=gen, dtype=torch.float64), "f64")]
    two = torch.nn.Parameter(torch.ones(8))  # two uses: stays on the per-parameter path
    uses[two] = [PerSampleUse(torch.randn(bsz, 8, generator=gen), "t0"),
                 PerSampleUse(torch.randn(bsz, 8, generator=gen), "t1")]
    return w, lin, f64, two, uses


def test_rows_group_by_width_and_leave_the_rest():
    w, lin, f64, two, uses = _uses()
    params = list(uses)
    rows = PerSampleRows(uses, params)
    assert rows.params == set(w)
    assert sorted(len(ps) for ps, _ in rows.groups) == [1, 3]
    for ps, g in rows.groups:
        for p, x in zip(ps, g.unbind(0)):
            assert torch.equal(x, uses[p][0].grads)


def test_norms64_equal_the_per_parameter_terms():
    w, _, _, _, uses = _uses()
    rows = PerSampleRows(uses, list(uses))
    got = {p: x for ps, m in rows.norms64() for p, x in zip(ps, m)}
    assert set(got) == set(w)
    for p in w:
        s, f, _ = _sqrt_q(uses[p][0])
        assert f == 1.0 and torch.equal(got[p], s)


def test_release_bounds_same_with_rows():
    _, _, _, _, uses = _uses()
    params = list(uses)
    n2 = norms_sq(uses, params, backend="torch")
    plain = release_bounds(uses, params, n2, backend="torch")
    with_rows = release_bounds(uses, params, n2, backend="torch", rows=PerSampleRows(uses, params))
    for a, b in zip(plain, with_rows):
        assert torch.equal(a, b)


def test_bookkeep_rows_against_reference():
    w, _, _, _, uses = _uses()
    rows = PerSampleRows(uses, [w[0], w[1], w[2]])  # w[3] left out: not held
    c = torch.rand(6)
    keep = torch.tensor([True, False, True, True, True, True])
    scales = {p: (c if k % 2 else torch.rand(6)) for k, p in enumerate(w)}
    got = rows.bookkeep(scales, keep)
    assert set(got) == {w[0], w[1], w[2]} and w[3] not in rows
    for p in got:
        g = uses[p][0].grads
        assert got[p].shape == p.shape
        _check_sums(got[p].unsqueeze(0), g.unsqueeze(0), scales[p].unsqueeze(0), keep)
        # the per-parameter path on zeroed rows gives the same sums to the same bound
        ref = bookkeep([uses[p][0].zero_samples(keep)], scales[p], torch.zeros(p.shape))
        assert torch.allclose(ref, got[p], rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sums_stay_fp32_with_tf32_allowed():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        g = torch.randn(33, 16, 2048, device="cuda", generator=gen)
        s = torch.rand(16, device="cuda", generator=gen) + 0.5
        _check_sums(scaled_row_sums(g, stacked([s] * 33)), g, stacked([s] * 33))
        out = bookkeep([PerSampleUse(g[0], "w")], s, torch.zeros(2048, device="cuda"))
        _check_sums(out.unsqueeze(0), g[:1], s.unsqueeze(0))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _bound_per_parameter(uses, p, n2, mode):
    """U of one parameter evaluated on its own, use by use (the module docstring's formula): the
    reference for release_bound_matrix's gathered (P, B) evaluation."""
    from dpkern.layers import bounds as bd
    from dpkern.ops.rownorm import row_norm_dots
    parts, seq, d, w = [], 0, 1, 1
    for u in uses[p]:
        if isinstance(u, LinearUse):
            s = row_norm_dots(u.a, [u.g], backend="torch")[0]
            f, (t_u, d_u, p_u) = bd._use_terms(u)
        else:
            s, f, (t_u, d_u, p_u) = _sqrt_q(u)
        parts.append((s, f))
        seq, d, w = seq + t_u, max(d, d_u), max(w, p_u)
    sq = parts[0][0] * parts[0][1] if len(parts) == 1 else sum(s * f for s, f in parts)
    eta, beta = bd._error_terms(seq, d, w, mode)
    n2 = n2.double().clamp_min(0)
    bound = ((n2 + eta * sq.square()).sqrt() + beta * sq) * (1.0 + 8 * bd.FP32_ULP)
    return torch.where(torch.isfinite(n2), bound, math.inf)


@pytest.mark.parametrize("with_rows", [False, True])
def test_release_bound_matrix_equals_the_per_parameter_bounds(with_rows):
    """Every kind of use and sharing: q/k reading one input (one row_norm_dots group), a weight
    used twice (an embedding lookup and an output projection, as tied weights are), per-sample
    rows of two widths, an fp64 and a two-use per-sample parameter, a non-finite norm. The
    gathered (P, B) matrix is bit for bit the per-parameter evaluation, and release_bounds its
    rows."""
    from dpkern.layers.bounds import release_bound_matrix
    from dpkern.layers.uses import EmbeddingUse
    from dpkern.ops._persample import fp32_mode
    w, lin, f64, two, uses = _uses()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 4, generator=gen)
    q, k = torch.nn.Parameter(torch.ones(5, 4)), torch.nn.Parameter(torch.ones(7, 4))
    uses[q] = [LinearUse(x, torch.randn(6, 2, 5, generator=gen), "q")]
    uses[k] = [LinearUse(x, torch.randn(6, 2, 7, generator=gen), "k")]
    tied = torch.nn.Parameter(torch.ones(11, 4))
    ids = torch.randint(0, 11, (6, 2), generator=gen)
    uses[tied] = [EmbeddingUse(ids, torch.randn(6, 2, 4, generator=gen), 0, "emb"),
                  LinearUse(torch.randn(6, 2, 4, generator=gen),
                            torch.randn(6, 2, 11, generator=gen), "head")]
    params = list(uses)
    n2 = norms_sq(uses, params, backend="torch")
    n2[1] = n2[1].clone()
    n2[1][2] = float("nan")
    rows = PerSampleRows(uses, params) if with_rows else None
    got = release_bound_matrix(uses, params, n2, backend="torch", rows=rows)
    assert got.shape == (len(params), 6) and got.dtype == torch.float64
    mode = fp32_mode(torch.device("cpu"))
    for i, p in enumerate(params):
        assert torch.equal(got[i], _bound_per_parameter(uses, p, n2[i], mode)), i
    assert math.isinf(got[1, 2])
    for a, b in zip(release_bounds(uses, params, n2, backend="torch", rows=rows), got):
        assert torch.equal(a, b)
    assert torch.equal(release_bound_matrix(uses, params, torch.stack(n2), backend="torch",
                                            rows=rows), got)
