"""Grouped launches (kernels/_tables.py): linear_norm_sq_grouped, row_norm_dots_grouped and
bookkeeping_wgrad_grouped.

Each layer of a grouped launch runs the same kernel with the same tiles as a launch of its own.
Book-keeping: bit for bit the single launch's result. Norms: up to the fp64 sum of the per-block
partials, which torch adds in an order that depends on the partials' shape (1 fp32 ulp after the
rounding). Bound sums: a tabled launch may also sum a row's squares in another order, so they are
held to the inflation dpkern/layers/bounds.py applies. All are also checked against the float64
references with the single-layer tests' tolerances.
Outputs are poisoned (NaN), and layers are mixed so that one call makes several groups, some of
one layer, with awkward shapes (B = 1, T = 63) and strided layouts.
"""
import pytest
import torch

import dpkern.kernels.bookkeeping as bk_kernels
import dpkern.kernels.ghost_norm as gn_kernels
import dpkern.kernels.row_norm_dots as rnd_kernels
from dpkern.ops.bookkeeping import bookkeeping_wgrad, bookkeeping_wgrad_grouped
from dpkern.ops.linear_norm import linear_norm_sq_grouped, linear_norm_sq_shared
from dpkern.ops.rownorm import row_norm_dots, row_norm_dots_grouped
from dpkern.layers.bounds import _gamma
from dpkern.reference.persample import bookkeeping_wgrad_ref
from dpkern.reference.rownorm import row_norm_dots_ref
from tests.conftest import HAS_GPU, kernel_devices
from tests.ops.test_bookkeeping import assert_close_signed, seen
from tests.ops.test_linear_norm import n_reduce
from tests.tolerance import assert_close_reduction

DTYPES = [torch.float32, torch.bfloat16]
# (B, T, d, [p_k]): layers of one case repeat these layouts
LAYOUTS = [(2, 63, 96, [96, 16, 16]), (1, 17, 24, [56]), (3, 5, 8, [8, 16])]
GPU_LAYOUTS = LAYOUTS + [(8, 128, 2048, [2048, 256, 256]), (8, 128, 5632, [2048])]


def _layers(layouts, repeats, dtype, device, transposed_last=True):
    """Layers as (a, gs): each layout `repeats` times; the last layer of the first layout reads a
    T-strided view (a different layout, so a group of its own)."""
    out = []
    for j, (bsz, seq, d, ps) in enumerate(layouts):
        for r in range(repeats):
            scale = 10.0 ** (r - 1)
            a = (torch.randn(bsz, seq, d) * scale).to(dtype).to(device)
            if transposed_last and j == 0 and r == repeats - 1:
                a = (torch.randn(bsz, d, seq) * scale).to(dtype).to(device).transpose(1, 2)
            gs = [torch.randn(bsz, seq, p).to(dtype).to(device) for p in ps]
            out.append((a, gs))
    return out


def _spy(monkeypatch, module, name):
    """Record the number of layers of each launch of module.name."""
    calls, real = [], getattr(module, name)

    def spy(as_, *args, **kw):
        calls.append(len(as_))
        return real(as_, *args, **kw)
    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", kernel_devices())
def test_grouped_norms_equal_single_launches(device, dtype, monkeypatch):
    torch.manual_seed(0)
    layouts = GPU_LAYOUTS if HAS_GPU else LAYOUTS
    layers = _layers(layouts, 3, dtype, device)
    calls = _spy(monkeypatch, gn_kernels, "_launch")
    got = linear_norm_sq_grouped(layers, backend="triton")
    # one launch per layout: the first layout's strided layer is a layout of its own
    assert sorted(calls) == sorted([2, 1] + [3] * (len(layouts) - 1)), calls
    for (a, gs), ns in zip(layers, got):
        want = linear_norm_sq_shared(a, gs, method="ghost", backend="triton")
        assert len(ns) == len(gs)
        for n, w, g in zip(ns, want, gs):
            assert n.shape == (a.shape[0],) and n.dtype == torch.float32
            torch.testing.assert_close(n, w, rtol=2.0 ** -23, atol=0)   # same kernel and tiles
            ref = torch.linalg.matrix_norm(seen(g).transpose(1, 2) @ seen(a)).square()
            assert_close_reduction(n, ref, n_reduce=n_reduce(a.shape[1], a.shape[2], g.shape[2]))


@pytest.mark.parametrize("device", kernel_devices())
def test_grouped_norms_torch_backend_and_empty(device):
    """The torch backend runs item by item; empty batches or sequences give zeros."""
    torch.manual_seed(1)
    layers = _layers(LAYOUTS[:2], 2, torch.float32, device, transposed_last=False)
    layers.append((torch.ones(0, 4, 8, device=device), [torch.ones(0, 4, 3, device=device)]))
    layers.append((torch.ones(2, 0, 8, device=device), [torch.ones(2, 0, 3, device=device)]))
    got = linear_norm_sq_grouped(layers, backend="torch")
    for (a, gs), ns in zip(layers, got):
        for n, w in zip(ns, linear_norm_sq_shared(a, gs, backend="torch")):
            assert torch.equal(n, w)
    assert got[-2][0].shape == (0,) and torch.all(got[-1][0] == 0)
    grouped = linear_norm_sq_grouped(layers, backend="triton")
    assert torch.all(grouped[-1][0] == 0) and grouped[-2][0].shape == (0,)


@pytest.mark.parametrize("why", ["unaligned", "many-tokens"])
@pytest.mark.parametrize("device", kernel_devices())
def test_ungroupable_layers_launch_alone(device, why, monkeypatch):
    """Tables promise the kernels 16-byte aligned pointers (vectorised loads), and layers above
    GROUP_MAX_TOKENS rows (DPKERN_GROUP_MAX_TOKENS; no limit by default) are not grouped: such
    layers of one layout are launched one by one, with the same results."""
    import dpkern.ops._persample as persample
    torch.manual_seed(4)
    bufs = [torch.randn(2, 9, 25, device=device).to(torch.bfloat16) for _ in range(3)]
    if why == "unaligned":
        layers = [(b[..., 1:], [torch.randn(2, 9, 8, device=device).to(torch.bfloat16)])
                  for b in bufs]
        assert layers[0][0].data_ptr() % 16 and layers[0][0].stride() == layers[1][0].stride()
    else:
        monkeypatch.setattr(persample, "GROUP_MAX_TOKENS", 17)   # 2 x 9 = 18 rows
        layers = [(b, [torch.randn(2, 9, 8, device=device).to(torch.bfloat16)]) for b in bufs]
    norm_calls = _spy(monkeypatch, gn_kernels, "_launch")
    dots_calls = _spy(monkeypatch, rnd_kernels, "_launch")
    bk_calls = _spy(monkeypatch, bk_kernels, "_launch")
    norms = linear_norm_sq_grouped(layers, backend="triton")
    dots = row_norm_dots_grouped(layers, backend="triton")
    sums = bookkeeping_wgrad_grouped([(a, gs[0], torch.ones(2, device=device), None, False)
                                      for a, gs in layers], backend="triton")
    assert norm_calls == dots_calls == bk_calls == [1, 1, 1]
    for (a, gs), n, r, w in zip(layers, norms, dots, sums):
        assert torch.equal(n[0], linear_norm_sq_shared(a, gs, method="ghost", backend="triton")[0])
        assert torch.equal(r, row_norm_dots(a, gs, backend="triton"))   # the same launches
        assert torch.equal(w, bookkeeping_wgrad(a, gs[0], torch.ones(2, device=device),
                                                backend="triton"))
    if why == "unaligned":
        with pytest.raises(ValueError, match="16-byte"):
            from dpkern.kernels._tables import pointer_table
            pointer_table([[a for a, _ in layers]], torch.device(device))


def test_grouped_norms_bad_input():
    a, g = torch.ones(2, 3, 4), torch.ones(2, 3, 5)
    with pytest.raises(TypeError, match="non-empty"):
        linear_norm_sq_grouped([(a, [])])
    with pytest.raises(ValueError, match="batch and sequence"):
        linear_norm_sq_grouped([(a, [g]), (a, [torch.ones(2, 4, 5)])])
    with pytest.raises(TypeError, match="list"):
        linear_norm_sq_grouped(a)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", kernel_devices())
def test_grouped_row_norm_dots_equal_single_launches(device, dtype, monkeypatch):
    torch.manual_seed(3)
    layouts = GPU_LAYOUTS if HAS_GPU else LAYOUTS
    layers = _layers(layouts, 3, dtype, device)
    layers.append((torch.ones(0, 4, 8, device=device, dtype=dtype),
                   [torch.ones(0, 4, 3, device=device, dtype=dtype)]))
    calls = _spy(monkeypatch, rnd_kernels, "_launch")
    got = row_norm_dots_grouped(layers, backend="triton")
    assert sorted(calls) == sorted([2, 1] + [3] * (len(layouts) - 1)), calls
    for (a, gs), r in zip(layers, got):
        want = row_norm_dots(a, gs, backend="triton")
        assert r.shape == want.shape == (len(gs), a.shape[0]) and r.dtype == torch.float64
        # the bounds inflate these sums by (1 + γ(d + p + 6)) for the fp32 row norms' rounding,
        # in any order (a tabled launch may compile to another reduction order): the grouped sums
        # must stay within that factor of the exact ones, as the single launches do
        ref = row_norm_dots_ref(a, gs)
        for k, g in enumerate(gs):
            rel = _gamma(a.shape[2] + g.shape[2] + 6)
            assert torch.all(r[k] * (1 + rel) >= ref[k]) and torch.all(r[k] <= ref[k] * (1 + rel))
            torch.testing.assert_close(r[k], want[k], rtol=2 * rel, atol=0)


def _bk_items(layouts, dtype, device, out_kind):
    torch.manual_seed(2)
    items = []
    for a, gs in _layers(layouts, 3, dtype, device):
        g = gs[0]
        scale = torch.rand(a.shape[0], device=device)
        scale[0] = 0.0                       # a dropped sample with non-finite gradients
        g[0, 0, 0] = float("nan")
        p, d = g.shape[2], a.shape[2]
        if out_kind == "none":
            out, acc = None, False
        else:
            out = torch.randn(p, d, device=device).to(
                torch.bfloat16 if out_kind == "bf16-accumulate" else torch.float32)
            acc = True
        items.append((a, g, scale, out, acc))
    return items


@pytest.mark.parametrize("out_kind", ["none", "fp32-accumulate", "bf16-accumulate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", kernel_devices())
def test_grouped_bookkeeping_equals_single_launches(device, dtype, out_kind, monkeypatch):
    layouts = [(b, t, d, ps[:1]) for b, t, d, ps in (GPU_LAYOUTS if HAS_GPU else LAYOUTS)]
    items = _bk_items(layouts, dtype, device, out_kind)
    singles = [bookkeeping_wgrad(a, g, s, out=None if o is None else o.clone(), accumulate=acc,
                                 backend="triton") for a, g, s, o, acc in items]
    before = [None if o is None else o.clone() for _, _, _, o, _ in items]
    calls = _spy(monkeypatch, bk_kernels, "_launch")
    grouped_path = not (device == "cuda" and dtype == torch.float32)  # fp32-TF32: one by one
    got = bookkeeping_wgrad_grouped(list(items), backend="triton")
    if grouped_path:
        assert max(calls) == 3 and len(calls) < len(items), calls
    for (a, g, s, o, acc), w, res, o0 in zip(items, singles, got, before):
        if o is not None:
            assert res is o
        assert torch.equal(res, w)             # same kernel, same tiles: bit-identical
        ref = bookkeeping_wgrad_ref(seen(a), seen(g).nan_to_num(), s.double())
        ref_abs = bookkeeping_wgrad_ref(seen(a).abs(), seen(g).abs().nan_to_num(), s.double())
        if o0 is not None:
            ref, ref_abs = ref + o0.double(), ref_abs + o0.double().abs()
        assert_close_signed(res, ref, ref_abs, a.shape[0] * a.shape[1] + 1, res.dtype)


@pytest.mark.parametrize("device", kernel_devices())
def test_grouped_bookkeeping_consume_and_per_layer_scales(device):
    """consume=True empties the caller's list as groups are issued; each layer keeps its own
    scale (per-layer clipping gives every layer different factors)."""
    a = torch.randn(2, 7, 8, device=device)
    g = torch.randn(2, 7, 5, device=device)
    items = [(a, g, torch.tensor([1.0, 0.0], device=device), None, False),
             (a, g, torch.tensor([0.0, 1.0], device=device), None, False)]
    got = bookkeeping_wgrad_grouped(items, backend="triton", consume=True)
    assert items == [None, None]
    torch.testing.assert_close(got[0] + got[1], bookkeeping_wgrad(
        a, g, torch.ones(2, device=device), backend="triton"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], bookkeeping_wgrad(
        a[:1], g[:1], torch.ones(1, device=device), backend="triton"), rtol=1e-5, atol=1e-5)


def test_grouped_bookkeeping_bad_input():
    a, g, s = torch.ones(2, 3, 4), torch.ones(2, 3, 5), torch.ones(2)
    with pytest.raises(ValueError, match="shape"):
        bookkeeping_wgrad_grouped([(a, g, s, torch.ones(4, 5), True)])
    with pytest.raises(TypeError, match="list"):
        bookkeeping_wgrad_grouped((a, g, s, None, False))


def test_tabled_kernels_load_as_wide_as_single_ones():
    """A tabled launch reads each layer's operands through pointers loaded from the table. Unless
    the compiler is told those pointers are 16-byte aligned (on the pointer itself: a hint on the
    int64 is lost at the int-to-pointer cast), every operand load is a scalar 2-byte load instead
    of a 16-byte async copy, and the tabled GEMMs ran ~3x slower than their own launches on the
    H100 (bench/results/grouped_h100). Compiled for sm_90 on any machine: the tabled kernels must
    issue exactly the single-layer kernels' operand loads, plus one 8-byte load per table read."""
    from tests.sm90_ptx import tabled_load_counts
    names = ["bookkeeping", "ghost_norm", "row_norm_dots", "kmajor_copy"]
    counts = tabled_load_counts(names)
    assert set(counts) == set(names)
    for name, c in counts.items():
        single, table = dict(c["single"]), dict(c["table"])
        assert 1 <= table.pop("ld.v1.b64", 0) - single.pop("ld.v1.b64", 0) <= 4, (name, c)
        assert table == single, (name, c)
        assert any(k.startswith("cp.async.16") or k.startswith("ld.v4") for k in single), (name, c)


def test_tma_bookkeeping_loads_by_descriptor_for_sm90():
    """The TMA form of the book-keeping kernel (16-bit, Hopper) compiled for sm_90, single-layer
    and tabled: its operand tiles come by TMA (cp.async.bulk.tensor) and by nothing else; the
    tabled one adds only its table reads."""
    from tests.sm90_ptx import tabled_load_counts
    c = tabled_load_counts(["bookkeeping_tma"])["bookkeeping_tma"]
    single, table = dict(c["single"]), dict(c["table"])
    assert single.get("tma", 0) >= 2 and table.get("tma") == single["tma"], c
    assert not any(k.startswith("cp.async.16") or k.startswith("ld.v4") for k in single), c
    assert 1 <= table.pop("ld.v1.b64", 0) - single.pop("ld.v1.b64", 0) <= 4, c
    assert table == single, c
