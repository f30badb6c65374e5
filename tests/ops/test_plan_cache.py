"""Launch plans of the grouped ops (dpkern.ops._persample.PlanCache): linear_norm_sq_grouped,
row_norm_dots_grouped and bookkeeping_wgrad_grouped plan (check and group) once per structure of
their items and reuse the plan while it repeats.

A reused plan must be the plan the op would build: the same launches and bit-identical results for
new tensors of the same structure; a new plan whenever anything it reads changes (a tensor's
16-byte alignment or strides, the fp32 mode, the grouping settings); and bad input after a cached
plan is still refused by the op's own checks.
"""
import pytest
import torch

import dpkern.kernels.bookkeeping as bk_kernels
import dpkern.kernels.ghost_norm as gn_kernels
import dpkern.kernels.row_norm_dots as rnd_kernels
import dpkern.ops._persample as persample
import dpkern.ops.bookkeeping as ob
import dpkern.ops.linear_norm as oln
import dpkern.ops.rownorm as orn
from dpkern.ops.bookkeeping import bookkeeping_wgrad, bookkeeping_wgrad_grouped
from dpkern.ops.linear_norm import linear_norm_sq_grouped, linear_norm_sq_shared
from dpkern.ops.rownorm import row_norm_dots, row_norm_dots_grouped
from tests.conftest import kernel_devices
from tests.ops.test_grouped import _spy

CACHES = {"norms": oln._PLANS, "dots": orn._PLANS, "bookkeeping": ob._PLANS}
SHAPES = [(2, 9, 24, [8, 16]), (1, 63, 96, [96])]  # (B, T, d, [p_k]): two layers of each


def _layers(device, dtype, seed, shapes=SHAPES, misalign=False):
    """(a, gs) per layer; a is a (B, T, d) window of a (B, T, d + 1) buffer: its first column
    (16-byte aligned start) or, for the first layer with misalign, its second (same shape and
    strides, a start 2 or 4 bytes past the boundary)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j, (bsz, seq, d, ps) in enumerate(shapes * 2):
        buf = torch.randn(bsz, seq, d + 1, generator=g).to(dtype).to(device)
        a = buf[..., 1:] if misalign and j == 0 else buf[..., :d]
        out.append((a, [torch.randn(bsz, seq, p, generator=g).to(dtype).to(device) for p in ps]))
    return out


def _run_all(layers, device):
    scale = {a.shape[0]: torch.rand(a.shape[0], generator=torch.Generator().manual_seed(7))
             .to(device) for a, _ in layers}
    norms = linear_norm_sq_grouped(layers, backend="triton")
    dots = row_norm_dots_grouped(layers, backend="triton")
    sums = bookkeeping_wgrad_grouped([(a, gs[0], scale[a.shape[0]], None, False)
                                      for a, gs in layers], backend="triton")
    return norms, dots, sums, scale


def _check_against_single(layers, device, norms, dots, sums, scale):
    """Bit for bit what each layer gives alone (test_grouped.py: same kernels, same tiles)."""
    for (a, gs), n, r, w in zip(layers, norms, dots, sums):
        for got, want in zip(n, linear_norm_sq_shared(a, gs, method="ghost", backend="triton")):
            torch.testing.assert_close(got, want, rtol=2.0 ** -23, atol=0)
        torch.testing.assert_close(r, row_norm_dots(a, gs, backend="triton"), rtol=2.0 ** -50,
                                   atol=0)
        assert torch.equal(w, bookkeeping_wgrad(a, gs[0], scale[a.shape[0]], backend="triton"))


def _misses():
    return {k: c.misses for k, c in CACHES.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", kernel_devices())
def test_repeated_structure_reuses_its_plan(device, dtype, monkeypatch):
    calls = {"norms": _spy(monkeypatch, gn_kernels, "_launch"),
             "dots": _spy(monkeypatch, rnd_kernels, "_launch"),
             "bookkeeping": _spy(monkeypatch, bk_kernels, "_launch")}
    first = _layers(device, dtype, seed=0)
    _run_all(first, device)
    before, launches = _misses(), {k: list(v) for k, v in calls.items()}
    for v in calls.values():
        v.clear()
    second = _layers(device, dtype, seed=1)   # new tensors and values, one structure
    got = _run_all(second, device)
    assert _misses() == before   # no op planned again
    assert {k: list(v) for k, v in calls.items()} == launches   # the same launches
    _check_against_single(second, device, *got)


@pytest.mark.parametrize("device", kernel_devices())
def test_alignment_change_plans_again(device, monkeypatch):
    """One layer's input moves off the 16-byte boundary, same shape and strides: a cached plan
    would put it in a pointer table (vectorised loads of a misaligned pointer); a new one runs it
    alone."""
    calls = _spy(monkeypatch, gn_kernels, "_launch")
    dtype = torch.bfloat16
    _run_all(_layers(device, dtype, seed=2), device)
    assert sorted(calls) == [2, 2]
    calls.clear()
    before = _misses()
    layers = _layers(device, dtype, seed=3, misalign=True)
    assert layers[0][0].data_ptr() % 16 and layers[0][0].stride() == layers[2][0].stride()
    got = _run_all(layers, device)
    assert all(_misses()[k] == before[k] + 1 for k in CACHES)
    assert sorted(calls) == [1, 1, 2]
    _check_against_single(layers, device, *got)


@pytest.mark.parametrize("device", kernel_devices())
def test_settings_and_mode_changes_plan_again(device, monkeypatch):
    """The grouping limit and the fp32 mode are part of a plan: changing either after a cached
    plan gives the plan (and the numbers) of the new setting."""
    layers = _layers(device, torch.float32, seed=4)
    _run_all(layers, device)
    calls = _spy(monkeypatch, gn_kernels, "_launch")
    monkeypatch.setattr(persample, "GROUP_MAX_TOKENS", 17)   # 2 x 9 = 18 rows and 63 rows
    got = _run_all(layers, device)
    assert calls == [1, 1, 1, 1]
    _check_against_single(layers, device, *got)
    monkeypatch.undo()
    for mode in ("tf32r", "ieee"):
        monkeypatch.setenv("DPKERN_FP32_DOT", mode)
        norms, dots, sums, scale = _run_all(layers, device)
        _check_against_single(layers, device, norms, dots, sums, scale)
        a, gs = layers[0]
        assert torch.equal(sums[0], bookkeeping_wgrad(a, gs[0], scale[a.shape[0]],
                                                      backend="triton", fp32_mode=mode))
    tf32 = linear_norm_sq_grouped(layers, backend="triton", fp32_mode="tf32r")[0][0]
    assert not torch.equal(tf32, norms[0][0])   # the two modes do give other numbers here


@pytest.mark.parametrize("device", kernel_devices())
def test_bad_input_after_a_cached_plan_is_refused(device):
    layers = _layers(device, torch.float32, seed=5)
    _run_all(layers, device)
    a, gs = layers[0]
    short = torch.ones(a.shape[0], a.shape[1] - 1, 8, device=device)
    with pytest.raises(ValueError, match="batch and sequence"):
        linear_norm_sq_grouped(layers[:-1] + [(a, [short])], backend="triton")
    with pytest.raises(ValueError, match="batch and sequence"):
        row_norm_dots_grouped(layers[:-1] + [(a, [short])], backend="triton")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        linear_norm_sq_grouped(layers[:-1] + [(a, [gs[0].tolist()])], backend="triton")
    scale = torch.ones(a.shape[0], device=device)
    items = [(x, y[0], torch.ones(x.shape[0], device=device), None, False) for x, y in layers]
    bookkeeping_wgrad_grouped(list(items), backend="triton")
    with pytest.raises(TypeError, match="scale"):
        bookkeeping_wgrad_grouped(items[:-1] + [(a, gs[0], scale.double(), None, False)],
                                  backend="triton")
    with pytest.raises(ValueError, match="out must have shape"):
        bookkeeping_wgrad_grouped(items[:-1] + [(a, gs[0], scale, torch.zeros(3, 3), True)],
                                  backend="triton")


def test_plan_cache_bounded_and_keyless_items_not_stored():
    cache = persample.PlanCache(size=2)
    for k in range(3):
        assert cache.get(k, lambda: [k]) == [k]
    assert len(cache._plans) == 2 and 0 not in cache._plans   # oldest plan dropped
    built = []
    for _ in range(2):
        cache.get(None, lambda: built.append(1) or [])
    assert len(built) == 2 and None not in cache._plans
    assert persample.shared_items_sig([(1, [2])]) == (None, None)
    assert persample.shared_items_sig([(torch.ones(1, 1, 1), torch.ones(1, 1, 1))]) == (None, None)


def test_plan_cache_off_plans_every_call(monkeypatch):
    monkeypatch.setattr(persample.PlanCache, "enabled", False)
    cache, built = persample.PlanCache(), []
    for _ in range(2):
        assert cache.get("k", lambda: built.append(1) or ["plan"]) == ["plan"]
    assert len(built) == 2 and not cache._plans
