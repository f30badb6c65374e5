"""The warm path batches all stacks (shapes) of a call into one orthonormalisation per pass, one
small SVD and one shrinkage, zero-padded to common sizes: each matrix's result must be the one it
gets alone, and the call's op count must stay bounded (a per-stack or per-matrix regression of
the batched work fails `test_warm_call_op_count_is_bounded`).

Tolerance policy (batched vs alone, fp32): padding adds exact zeros and each matrix keeps its
own CholeskyQR shift, so the only differences are the roundings of GEMMs of other sizes.
Measured on the CPU: 0 (bit-identical) with cholqr2, <= 4e-7 of ||a|| with Householder QR (its
padding columns are completed, then zeroed). Held to 1e-5 of ||a|| (approximation u core vh),
1e-5 of the top value (singular values) and 1e-5 of ||output|| (denoised matrices).
"""
import pytest
import torch

from dpkern.denoise import RMTDenoiser, denoise_matrices_
from dpkern.denoise.denoiser import _denoise_all
from dpkern.denoise.rsvd import as_batch, shift_coef, small_svd, warm_svd, warm_svd_stacks
from dpkern.denoise.shrinkers import shrink, shrink_dims, shrink_rows
from tests.denoise.planted import drifting, planted
from tests.opcount import count_launches

SIGMA = 1e-3
TOL = 1e-5
# odd sizes on purpose: m > n (used as a transposed view), square, a stack of one matrix, widths
# that give different l (padding in columns) and different row counts (padding in rows)
SPECS = [(3, 40, 90, 4), (1, 70, 70, 10), (2, 50, 121, 6)]        # (b, m, n, carried width)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _stacks():
    stacks, v0, seeds = [], [], []
    for j, (b, m, n, c) in enumerate(SPECS):
        _, a = planted(b, m, n, [8.0, 5.0, 3.0], SIGMA, seed=j, dtype=torch.float32)
        stacks.append(a)
        g = torch.Generator().manual_seed(100 + j)
        # a warm start: the top right vectors, perturbed, then random columns
        vs = torch.linalg.svd(a.double(), full_matrices=False)[2][:, :c].mT.float()   # (b, n, c)
        v0.append([torch.linalg.qr(v + 0.1 * torch.randn(v.shape, generator=g) / n**0.5)[0]
                   for v in vs])
        seeds.append([10 * j + i for i in range(b)])
    stacks[2] = stacks[2].mT.contiguous().mT                    # stored (b, n, m): a view
    return stacks, v0, seeds


def _thr(m, n):
    return 3.0 * SIGMA * (m**0.5 + n**0.5)


def _relerr(x, ref, scale):
    return float((x.double() - ref.double()).norm() / scale)


def test_small_svd_padded_blocks_equal_each_alone():
    g = torch.Generator().manual_seed(0)
    sizes, big = (5, 9, 12, 1), 12
    def orth(l):
        return torch.linalg.qr(torch.randn(l, l, generator=g, dtype=torch.float64))[0]
    # values 3^-i apart: 8 QR steps decouple them to (1/9)^8 (closer values converge slower)
    rs = [orth(l) @ torch.diag(3.0 ** -torch.arange(l, dtype=torch.float64)) @ orth(l)
          for l in sizes]
    padded = torch.zeros(len(sizes), big, big, dtype=torch.float64)
    for i, (r, l) in enumerate(zip(rs, sizes)):
        padded[i, :l, :l] = r
    coef = torch.tensor([shift_coef(l, l) for l in sizes], dtype=torch.float64)
    mask = (torch.arange(big) < torch.tensor(sizes)[:, None]).double()
    w, t, z = small_svd(padded, 8, coef=coef, mask=mask)
    for i, (r, l) in enumerate(zip(rs, sizes)):
        w1, t1, z1 = small_svd(r[None], 8)
        # Alone and padded, the BLAS may sum the products in another order (MKL picks kernels by
        # size); the 8 iterations amplify an ulp of difference by up to the ratio of r's extreme
        # singular values, 3^(l-1): tolerance 256 u 3^(l-1) (l = 9: 3.7e-10; 5.4e-11 seen on a
        # 2-core AMD EPYC with torch 2.13's MKL). A block mixed with its neighbour's padding
        # would be off by O(1).
        tol = 256 * torch.finfo(torch.float64).eps * 3.0 ** (l - 1)
        for x, ref in ((w, w1), (t, t1), (z, z1)):
            torch.testing.assert_close(x[i, :l, :l], ref[0], rtol=tol, atol=tol)
            assert (x[i, :l, l:] == 0).all() and (x[i, l:, :l] == 0).all()   # never mixed
        # and it is an SVD of r: w t z^T = r, t nearly diagonal with r's singular values
        torch.testing.assert_close(w[i, :l, :l] @ t[i, :l, :l] @ z[i, :l, :l].mT, r,
                                   rtol=0, atol=1e-12)
        # (values below sqrt(shift) ~ 2e-6 ||r|| are perturbed by the CholeskyQR shift)
        torch.testing.assert_close(t[i, :l, :l].diagonal(), torch.linalg.svdvals(r),
                                   rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("orth", ["cholqr2", "qr"])
@pytest.mark.parametrize("passes", [2, 3, 4])
def test_warm_svd_stacks_each_matrix_equals_alone(orth, passes):
    stacks, v0, seeds = _stacks()
    thr = torch.cat([torch.full((b,), _thr(m, n)) for b, m, n, _ in SPECS])
    st: dict = {}
    res = warm_svd_stacks(stacks, thr, v0, rank=4, oversample=8, passes=passes,
                          generators=[_gens(s) for s in seeds], orth=orth, stats=st)
    assert st["passes"] == passes * sum(b for b, *_ in SPECS)
    assert res.u.shape == (6, 70, 18) and res.vh.shape == (6, 18, 121)     # padded to the max
    for j, (b, m, n, _) in enumerate(SPECS):
        u, s, vh, core, sat = res.stack(j)
        for i in range(b):      # the same matrix alone: a stack of one, its own generator
            u1, s1, vh1, core1, sat1 = warm_svd(stacks[j][i:i + 1], _thr(m, n), v0[j][i:i + 1],
                                                rank=4, oversample=8, passes=passes,
                                                generators=_gens(seeds[j][i:i + 1]), orth=orth)
            assert u.shape[1:] == u1.shape[1:] and vh.shape[1:] == vh1.shape[1:]
            approx = u[i] @ core[i].float() @ vh[i]
            alone = u1[0] @ core1[0].float() @ vh1[0]
            assert _relerr(approx, alone, stacks[j][i].norm()) <= TOL, (j, i)
            assert _relerr(s[i], s1[0], s1[0, 0]) <= TOL
            assert bool(sat[i]) == bool(sat1[0])
            # it is a good approximation at all (not two equal wrong answers)
            top = torch.linalg.svdvals(stacks[j][i].double())[:3]
            torch.testing.assert_close(s[i, :3].double(), top, rtol=1e-3, atol=0)
    # nothing outside each matrix's block (the padding never leaks into a result)
    for a0, a1, m, n, l, _ in res.parts:
        assert (res.u[a0:a1, m:] == 0).all() and (res.u[a0:a1, :, l:] == 0).all()
        assert (res.vh[a0:a1, :, n:] == 0).all() and (res.s[a0:a1, l:] == 0).all()


def test_shrink_rows_equals_shrink_per_shape():
    s = torch.rand(4, 7, dtype=torch.float64) * 0.5
    shapes = [(40, 90), (90, 40), (70, 70), (3, 200)]
    dims = torch.tensor([shrink_dims(m, n) for m, n in shapes], dtype=torch.float64)
    for kind in ("frobenius", "operator", "nuclear", "hard"):
        out = shrink_rows(s, 0.02, dims, kind, kappa=1.1)
        for i, (m, n) in enumerate(shapes):
            assert torch.equal(out[i], shrink(s[i], 0.02, m, n, kind, kappa=1.1)), (kind, i)


def test_as_batch_only_for_equally_spaced_views():
    buf = torch.randn(4, 6, 5)
    assert torch.equal(as_batch(list(buf)), buf)
    t = buf.mT                                                  # (4, 5, 6) transposed views
    assert torch.equal(as_batch(list(t)), t)
    assert as_batch([buf[0], buf[2]]).data_ptr() == buf.data_ptr()          # stride 2
    for bad in ([buf[0], buf[1].clone()], [buf[0], buf[1, :5]], [buf[1], buf[0]],
                [buf[0, :5], buf.view(-1)[1:31].view(6, 5)[:5]],           # overlapping
                [buf[0], buf[1], buf[3]]):                                  # uneven spacing
        assert as_batch(bad) is None


def _named(shapes):
    return {f"l{i}.w": shape for i, shape in enumerate(shapes)}


# (m > n) next to its transpose, two squares, a single matrix of its own shape, an odd shape
SHAPES = _named([(90, 37), (37, 90), (64, 64), (64, 64), (50, 131), (33, 41)])


def test_denoiser_each_matrix_equals_alone_over_warm_steps():
    seq = drifting(3, SHAPES, [8.0, 4.0, 2.5], SIGMA, seed=2)
    joint = RMTDenoiser(seed=4, resync_every=0)
    alone = {k: RMTDenoiser(seed=4, resync_every=0) for k in SHAPES}  # same (seed, call, name)
    for t, (_, noisy) in enumerate(seq):
        out = {k: v.clone() for k, v in noisy.items()}
        joint(out, SIGMA)
        for k, den in alone.items():
            one = {k: noisy[k].clone()}
            den(one, SIGMA)
            assert _relerr(out[k], one[k], one[k].norm().clamp_min(1e-30)) <= TOL, (t, k)
            if t:
                assert den.last_stats["syncless"]
        if t:
            assert joint.last_stats["syncless"] and joint.last_stats["passes_per_matrix"] == 4
    assert joint.last_ranks == {k: d.last_ranks[k] for k, d in alone.items()}


def test_gradients_in_one_buffer_are_written_by_one_gemm():
    # Gradients that are equally spaced slices of one buffer are denoised in place through a
    # view (no stacking copy, one output GEMM), with the result of separate tensors.
    seq = drifting(2, {"a": (48, 100), "b": (48, 100), "c": (48, 100)}, [6.0, 3.0], SIGMA, 5)
    seq_t = drifting(2, {"a": (100, 48), "b": (100, 48)}, [6.0, 3.0], SIGMA, 6)
    for steps in (seq, seq_t):
        sep, buf = RMTDenoiser(seed=1), RMTDenoiser(seed=1)
        for _, noisy in steps:
            a = {k: v.clone() for k, v in noisy.items()}
            flat = torch.stack(list(noisy.values()))
            b = dict(zip(noisy, flat.unbind(0)))                 # views of `flat`
            sep(a, SIGMA)
            buf(b, SIGMA)
            for k in a:
                assert _relerr(b[k], a[k], a[k].norm()) <= TOL, k
                assert b[k].data_ptr() == flat[list(noisy).index(k)].data_ptr()
        assert buf.last_stats["syncless"]
    with count_launches() as ops:                                # the view path: no stack
        buf(b, SIGMA)
    assert ops.by_name["aten.stack.default"] == 0 and ops.by_name["aten.mm.out"] == 0


def test_column_major_gradients():
    # a gradient stored transposed (stride (1, rows)) is a one-matrix view stack: the GEMMs and
    # the output GEMM use its strides, with the result of a contiguous copy
    seq = drifting(3, {"a": (90, 37), "b": (64, 80)}, [8.0, 4.0], SIGMA, seed=1)
    d1, d2 = RMTDenoiser(seed=0), RMTDenoiser(seed=0)
    for _, noisy in seq:
        g1 = {k: v.clone() for k, v in noisy.items()}
        g2 = {k: v.T.contiguous().T for k, v in noisy.items()}
        d1(g1, SIGMA)
        d2(g2, SIGMA)
        for k in g1:
            assert g2[k].stride() == (1, g2[k].shape[0])
            assert _relerr(g2[k], g1[k], g1[k].norm()) <= TOL, k
    assert d2.last_stats["syncless"]


def test_workspace_is_kept_and_rebuilt_on_a_new_layout():
    seq = drifting(4, SHAPES, [8.0, 4.0], SIGMA, seed=7)
    den = RMTDenoiser(seed=0, resync_every=0)
    ptrs = []
    for _, noisy in seq:
        den({k: v.clone() for k, v in noisy.items()}, SIGMA)
        ws = den._workspace.get("cpu", {}).get("svd")
        ptrs.append(None if ws is None else ws["y_n"].data_ptr())
    # the cold call (batched too) fills it for its own layout; the warm calls keep theirs
    assert ptrs[0] is not None and ptrs[1] == ptrs[2] == ptrs[3]
    # the same computation without a kept workspace (fresh buffers): the same output
    state = [den._state[k]["v"].clone() for k in SHAPES]
    a = [seq[-1][1][k].clone() for k in SHAPES]
    b = [x.clone() for x in a]
    ws: dict = {}
    denoise_matrices_(a, SIGMA, generators=_gens(range(len(a))), warm_start=state)
    _denoise_all(b, SIGMA, generators=_gens(range(len(b))), warm_start=state, info={},
                 workspace=ws)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    layout = ws["cpu"]["svd"]["layout"]
    # a new layout (wider carried blocks) rebuilds the buffers
    wider = [torch.cat([v, v[:, :1]], 1) for v in state]
    _denoise_all([x.clone() for x in a], SIGMA, warm_start=wider, info={}, workspace=ws)
    assert ws["cpu"]["svd"]["layout"] != layout


def _llama_like(layers, hidden, inter):
    per = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden),
           "o": (hidden, hidden), "gate": (inter, hidden), "up": (inter, hidden),
           "down": (hidden, inter)}
    return {f"layers.{i}.{k}.weight": s for i in range(layers) for k, s in per.items()}


def _warm_op_count(shapes, max_batch_numel):
    g = torch.Generator().manual_seed(0)
    grads = {}
    for k, (m, n) in shapes.items():       # rank-3 signal in noise: a few values kept each
        u, v = torch.randn(m, 3, generator=g), torch.randn(n, 3, generator=g)
        grads[k] = 0.3 * SIGMA * (u @ v.T) + SIGMA * torch.randn(m, n, generator=g)
    den = RMTDenoiser(seed=0, max_batch_numel=max_batch_numel)
    for _ in range(2):                                           # cold, then warm
        den({k: v.clone() for k, v in grads.items()}, SIGMA)
    out = {k: v.clone() for k, v in grads.items()}
    with count_launches() as ops:
        den(out, SIGMA)
    assert den.last_stats["syncless"]
    return ops


@pytest.mark.parametrize("layers, chunk, stacks", [(2, 1 << 28, 3), (22, 1 << 16, 5)],
                         ids=["2-layers", "1B-structure"])
def test_warm_call_op_count_is_bounded(layers, chunk, stacks):
    # The 1B model's structure (22 layers x 7 matrices, its 5 stacks: max_batch_numel scaled
    # with the matrix sizes) at hidden 32: per matrix one random block, per
    # stack a stacking copy, a start copy, one GEMM per pass and one output GEMM (the results
    # of the copied stacks go back as views of it), everything else once per call.
    # Measured (1B structure): 445 launching ops (n + 9 stacks + 246) since the output GEMM per
    # stack; 586 since 5a6bf2c (606 at e258954), with an output GEMM per matrix; at 2 layers
    # 291 (n + 9 stacks + 250); before the batching (f7d9643..8d3f07c) 1876.
    shapes = _llama_like(layers, 32, 86)
    ops = _warm_op_count(shapes, chunk)
    n = len(shapes)
    assert ops.by_name["aten.normal_.default"] == n and "aten.mm.out" not in ops.by_name
    assert ops.by_name["aten.bmm.out"] == 5 * stacks      # per stack one GEMM per pass + output
    assert ops.by_name["aten.linalg_cholesky_ex.default"] == 2 * 4 + 2 * 8   # once per call
    assert ops.total <= n + 9 * stacks + 255, ops.top()


def test_warm_call_replaces_copied_fp32_entries_with_one_gemm_result():
    """A warm call on a dict of separately allocated float32 matrices (the engine's
    accumulators) puts views of its stack in the dict instead of writing each matrix back: the
    values equal the in-place result (the list API, same state and sketches) to GEMM rounding,
    the tensors the dict held are left as they were, and 16-bit entries and read-only mappings
    are still overwritten in place."""
    import types
    shapes = _llama_like(2, 32, 86)
    g = torch.Generator().manual_seed(5)
    grads = {}
    for k, (m, n) in shapes.items():
        u, v = torch.randn(m, 3, generator=g), torch.randn(n, 3, generator=g)
        grads[k] = 0.3 * SIGMA * (u @ v.T) + SIGMA * torch.randn(m, n, generator=g)
    den = RMTDenoiser(seed=0)
    for _ in range(2):                                           # cold, then warm
        den({k: v.clone() for k, v in grads.items()}, SIGMA)
    state = den.state_dict()
    out = {k: v.clone() for k, v in grads.items()}
    held = dict(out)
    den(out, SIGMA)
    assert den.last_stats["syncless"]
    ref_den = RMTDenoiser(seed=0)
    ref_den.load_state_dict(state)
    ro = {k: v.clone() for k, v in grads.items()}
    ref_den(types.MappingProxyType(ro), SIGMA)                   # read-only: written in place
    for k in shapes:
        assert out[k] is not held[k] and torch.equal(held[k], grads[k])   # left as it was
        assert out[k].shape == grads[k].shape and out[k].is_contiguous()
        torch.testing.assert_close(out[k], ro[k], rtol=0, atol=1e-6 * float(ro[k].abs().max()))
        assert not torch.equal(ro[k], grads[k])                  # ro's tensors were denoised
    # 16-bit gradients: written back in their own tensors
    den16 = RMTDenoiser(seed=0)
    den16.load_state_dict(state)
    b16 = {k: v.bfloat16() for k, v in grads.items()}
    held16 = dict(b16)
    den16(b16, SIGMA)
    assert all(b16[k] is held16[k] and b16[k].dtype == torch.bfloat16 for k in shapes)
