"""LinearInputs / SharedItems: one backward's Linear uses grouped by shared input once, for the
norms and the release bounds' sums. Handing them in changes no value (bit for bit), a parameter
with several Linear uses that shares an input with single-use ones still gets its full norm, and
the shared items' layouts are read once for both ops."""
import pytest
import torch

from dpkern.layers.bounds import release_bound_matrix
from dpkern.layers.uses import LinearInputs, LinearUse, PerSampleUse, norms_sq, param_norm_sq
from dpkern.ops import _persample
from dpkern.ops._persample import SharedItems, shared_items_sig
from dpkern.ops.linear_norm import linear_norm_sq_grouped
from dpkern.ops.rownorm import row_norm_dots_grouped

BACKENDS = ["torch", "triton"]


def _uses(bsz, seq=7, d=12, *, multi):
    """q/k (one input a), o (its own input), a norm weight; with multi, k's weight also has a
    second Linear use (a layer called twice) on another input."""
    gen = torch.Generator().manual_seed(bsz)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    a, a2 = r(bsz, seq, d), r(bsz, seq, d)
    q, k, o, w = (torch.nn.Parameter(torch.zeros(1)) for _ in range(4))
    uses = {q: [LinearUse(a, r(bsz, seq, 8), "q")],
            k: [LinearUse(a, r(bsz, seq, 5), "k")],
            o: [LinearUse(a2, r(bsz, seq, 12), "o")],
            w: [PerSampleUse(r(bsz, d), "norm")]}
    if multi:
        uses[k].append(LinearUse(a2, r(bsz, seq, 5), "k_again"))
    return uses, [q, k, o, w]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("bsz", [1, 3])
def test_handing_linear_inputs_changes_nothing(backend, multi, bsz):
    uses, params = _uses(bsz, multi=multi)
    linear = LinearInputs(uses, params)
    assert linear.all_single is not multi
    assert [[u.path for _, u in g] for g in linear.groups] == (
        [["q", "k"], ["k_again", "o"]] if multi else [["q", "k"], ["o"]])
    plain = norms_sq(uses, params, backend=backend)
    shared = norms_sq(uses, params, backend=backend, linear=linear)
    for x, y in zip(plain, shared):
        assert torch.equal(x, y)
    # every parameter's norm is that of all its uses (k's two uses add up, across the groups)
    for p, n in zip(params, shared):
        torch.testing.assert_close(n, param_norm_sq(uses[p], backend=backend), rtol=1e-5, atol=0)
    b_plain = release_bound_matrix(uses, params, plain, backend=backend)
    b_shared = release_bound_matrix(uses, params, shared, backend=backend, linear=linear)
    assert torch.equal(b_plain, b_shared)
    assert torch.all(b_shared >= torch.stack(shared).double().sqrt())


def test_shared_items_layouts_read_once(monkeypatch):
    uses, params = _uses(3, multi=False)
    calls = []
    real = _persample._items_sig
    monkeypatch.setattr(_persample, "_items_sig", lambda items: calls.append(1) or real(items))
    linear = LinearInputs(uses, params)
    n2 = norms_sq(uses, params, backend="triton", linear=linear)
    release_bound_matrix(uses, params, n2, backend="triton", linear=linear)
    assert len(calls) == 1  # the norms and the bounds' sums: one read of the Linear layouts
    release_bound_matrix(uses, params, n2, backend="triton")  # without: its own read
    assert len(calls) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_items_give_the_lists_results(backend):
    uses, _ = _uses(2, multi=False)
    a = next(iter(uses.values()))[0].a
    gs = [u.g for us in list(uses.values())[:2] for u in us]
    items = [(a, gs), (a, gs[:1])]
    frozen = SharedItems(items)
    assert frozen.sig == shared_items_sig(items) and shared_items_sig(frozen) is frozen.sig
    for op in (linear_norm_sq_grouped, row_norm_dots_grouped):
        for x, y in zip(op(items, backend=backend), op(frozen, backend=backend)):
            assert all(torch.equal(u, v) for u, v in zip(x, y))
