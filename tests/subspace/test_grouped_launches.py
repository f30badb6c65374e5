"""Grouped launches of the projected step: the projection of all layers of one rank and layout in
one launch (subspace_project_grouped), the back-projection + update of all weights of one
layout and step count in one launch (subspace_backproj_step_grouped_), each equal bit for bit to
the per-layer call (same kernel, same arithmetic; exact fp32 dots in the interpreter), and the
number of launches of a projected backward + step pinned so that a return to per-layer launches
fails.

Unwritten outputs fail: the output buffers are NaN-filled and dpkern's own allocations are
poisoned (tests/conftest.py); fresh optimizer states are poisoned and must not be read.
"""
import pytest
import torch

from dpkern import _alloc
from dpkern.noise.step import SGDHyper
from dpkern.subspace import orthonormalize, subspace_project, subspace_project_grouped
from dpkern.subspace.backproj import (AdamHyper, subspace_backproj_step_,
                                      subspace_backproj_step_grouped_)
from tests.conftest import HAS_GPU
from tests.opcount import count_launches
from tests.subspace.launches import dp_part_launches

DEV = "cuda" if HAS_GPU else "cpu"


def _orth(n, r, gen):
    return orthonormalize(torch.randn(n, r, generator=gen)).to(DEV)


def _misaligned(x):
    """x's values in a tensor that starts 4 bytes past a 16-byte boundary (not tabled)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    if buf.data_ptr() % 16 == 0 and x.element_size() < 16:
        y = buf[1:].view(x.shape)
    else:
        y = buf[:-1].view(x.shape)
    y.copy_(x)
    return y


# (B, T, ru, rv, [(d, p)...] per layer): layouts interleaved as in a transformer block (q/k/v/o
# share d = p, gate/up, down), p/d off the tiles, r = 1, B = 1, T = 63
PROJ_CASES = {
    "B2_T63_r5x3": (2, 63, 5, 3, [(24, 24), (24, 24), (24, 40), (40, 24), (24, 24), (24, 40)]),
    "B1_T9_r1x1": (1, 9, 1, 1, [(17, 33), (17, 33), (33, 17), (17, 33)]),
    "B3_T1_r16x16": (3, 1, 16, 16, [(70, 70), (70, 130), (70, 70)]),
}


def _proj_layers(case, dtype, seed=0, shared_a=True, misalign=None):
    bsz, seq, ru, rv, dims = PROJ_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    acts = {}
    layers = []
    for k, (d, p) in enumerate(dims):
        if not shared_a or d not in acts:  # q/k/v read one input tensor, as in the engine
            acts[d] = torch.randn(bsz, seq, d, generator=gen).to(DEV, dtype)
        a = acts[d]
        g = torch.randn(bsz, seq, p, generator=gen).to(DEV, dtype)
        if k == misalign:
            g = _misaligned(g)
        layers.append((a, g, _orth(p, ru, gen), _orth(d, rv, gen)))
    return layers


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(PROJ_CASES))
def test_projection_grouped_equals_per_layer(case, dtype, backend):
    """Every layer's S and ‖S‖² from the grouped call equal its own subspace_project call bit for
    bit; one launch per layout plus one reduce (triton)."""
    bsz, seq, ru, rv, dims = PROJ_CASES[case]
    layers = _proj_layers(case, dtype)
    n_l = len(layers)
    s_all = torch.full((n_l, bsz, ru, rv), float("nan"), device=DEV)
    n_all = torch.full((n_l, bsz), float("nan"), device=DEV)
    with count_launches() as c:
        subspace_project_grouped(layers, (s_all, n_all), backend=backend)
    for k, x in enumerate(layers):
        s, n = subspace_project(*x, backend=backend)
        assert torch.equal(s_all[k], s), k
        assert torch.equal(n_all[k], n), k
    if backend == "triton":
        assert c.by_name["triton:_subspace_proj_fwd_kernel"] == len(set(dims))
        assert c.by_name["triton:_subspace_proj_reduce_kernel"] == 1
        assert c.triton == len(set(dims)) + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_projection_misaligned_and_separate_inputs(dtype):
    """A layer whose g is not 16-byte aligned leaves its layout's table for a launch of its own;
    layers with separate (not shared) inputs; results unchanged."""
    layers = _proj_layers("B2_T63_r5x3", dtype, seed=3, shared_a=False, misalign=1)
    bsz, _, ru, rv, dims = PROJ_CASES["B2_T63_r5x3"]
    s_all = torch.full((len(layers), bsz, ru, rv), float("nan"), device=DEV)
    n_all = torch.full((len(layers), bsz), float("nan"), device=DEV)
    with count_launches() as c:
        subspace_project_grouped(layers, (s_all, n_all), backend="triton")
    for k, x in enumerate(layers):
        s, n = subspace_project(*x, backend="triton")
        assert torch.equal(s_all[k], s) and torch.equal(n_all[k], n), k
    assert c.by_name["triton:_subspace_proj_fwd_kernel"] == len(set(dims)) + 1


def test_per_layer_switch(monkeypatch):
    """DPKERN_SUBSPACE_GROUPED=0 (for timing the two paths against each other): one launch per
    layer and weight, the same results."""
    layers = _proj_layers("B1_T9_r1x1", torch.float32)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("DPKERN_SUBSPACE_GROUPED", flag)
        s_all, n_all = torch.empty(4, 1, 1, 1, device=DEV), torch.empty(4, 1, device=DEV)
        ws, us, ss, vs = _backproj_inputs(BACKPROJ_CASES["r1"], torch.float32, 2)
        with count_launches() as c:
            subspace_project_grouped(layers, (s_all, n_all), backend="triton")
            subspace_backproj_step_grouped_(ws, us, ss, vs, BACKPROJ_HYPERS["adamw"],
                                            [{} for _ in ws], backend="triton")
        outs.append((s_all, n_all, ws))
        per_layer = flag == "0"
        assert c.by_name["triton:_subspace_proj_fwd_kernel"] == (4 if per_layer else 2)
        assert c.by_name["triton:_subspace_backproj_fwd_kernel"] == (3 if per_layer else 2)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2]))


def test_projection_grouped_refuses():
    layers = _proj_layers("B1_T9_r1x1", torch.float32)
    s, n = torch.zeros(4, 1, 1, 1, device=DEV), torch.zeros(4, 1, device=DEV)
    with pytest.raises(ValueError, match="out S must be"):
        subspace_project_grouped(layers, (s[:3], n[:3]))
    bad = layers[:1] + [(layers[1][0], layers[1][1], layers[1][2], torch.zeros(17, 2, device=DEV))]
    with pytest.raises(ValueError, match="RV = 2"):
        subspace_project_grouped(bad, (s[:2], n[:2]))
    with pytest.raises(ValueError, match="no layers"):
        subspace_project_grouped([], (s, n))
    assert (s == 0).all() and (n == 0).all()


BACKPROJ_HYPERS = {
    "adamw": AdamHyper(lr=1e-2, weight_decay=0.1, eps=1e-6, decoupled=True),
    "adam-l2": AdamHyper(lr=1e-2, beta1=0.8, beta2=0.99, weight_decay=0.1),
    "sgd": SGDHyper(lr=0.1, weight_decay=0.01),
    "sgd-momentum": SGDHyper(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd-nesterov": SGDHyper(lr=0.1, momentum=0.9, nesterov=True),
}
# (p, d, ru, rv) per weight: two layouts interleaved, off the 64 x 64 tile; r = 1; p = 1
BACKPROJ_CASES = {
    "p70_d130_r5x3": [(70, 130, 5, 3), (37, 70, 5, 3), (70, 130, 5, 3), (70, 130, 5, 3)],
    "r1": [(1, 200, 1, 1), (130, 3, 1, 1), (1, 200, 1, 1)],
}


def _backproj_inputs(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    ws, us, vs = [], [], []
    for p, d, ru, rv in shapes:
        ws.append((torch.randn(p, d, generator=gen) * 0.1).to(DEV, dtype))
        us.append(_orth(p, ru, gen))
        vs.append(_orth(d, rv, gen))
    # the released rows of one (L, ru, rv) buffer per rank, as the engine hands them over
    ss = [torch.randn(ru, rv, generator=gen).to(DEV) * 3 for _, _, ru, rv in shapes]
    return ws, us, ss, vs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opt", list(BACKPROJ_HYPERS))
@pytest.mark.parametrize("case", list(BACKPROJ_CASES))
def test_backproj_grouped_equals_per_weight(case, opt, dtype):
    """Two steps (fresh poisoned states, then existing ones): W and every state equal the
    per-weight op's bit for bit; one launch per layout (and step count)."""
    hyper = BACKPROJ_HYPERS[opt]
    shapes = BACKPROJ_CASES[case]
    ws, us, _, vs = _backproj_inputs(shapes, dtype, 0)
    ws1 = [w.clone() for w in ws]
    sts, sts1 = [{} for _ in ws], [{} for _ in ws]
    for step in range(2):
        _, _, ss, _ = _backproj_inputs(shapes, dtype, 10 + step)
        with count_launches() as c:
            subspace_backproj_step_grouped_(ws, us, ss, vs, hyper, sts, backend="triton")
        for w, u, s, v, st in zip(ws1, us, ss, vs, sts1):
            subspace_backproj_step_(w, u, s, v, hyper, st, backend="triton")
        assert c.triton == len({sh[:2] for sh in shapes})
        for k in range(len(ws)):
            assert torch.equal(ws[k], ws1[k]), (step, k)
            assert sts[k].keys() == sts1[k].keys()
            for key, x in sts[k].items():
                assert torch.equal(x, sts1[k][key]), (step, k, key)
                if key != "step":
                    assert torch.isfinite(x).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backproj_mixed_step_counts_and_misaligned(dtype):
    """Adam weights of one layout at different step counts (one joined later) get one launch per
    step count; a misaligned weight its own launch; every result equals the per-weight op's."""
    hyper = BACKPROJ_HYPERS["adamw"]
    shapes = [(70, 130, 5, 3)] * 4
    ws, us, ss, vs = _backproj_inputs(shapes, dtype, 1)
    ws[3] = _misaligned(ws[3])
    sts = [{} for _ in ws]
    subspace_backproj_step_(ws[0], us[0], ss[0], vs[0], hyper, sts[0], backend="triton")
    subspace_backproj_step_(ws[1], us[1], ss[1], vs[1], hyper, sts[1], backend="triton")
    ws1 = [w.clone() for w in ws]
    sts1 = [{k: x.clone() for k, x in st.items()} for st in sts]
    with count_launches() as c:  # steps 2, 2, 1 (fresh), 1 (fresh, misaligned)
        subspace_backproj_step_grouped_(ws, us, ss, vs, hyper, sts, backend="triton")
    for w, u, s, v, st in zip(ws1, us, ss, vs, sts1):
        subspace_backproj_step_(w, u, s, v, hyper, st, backend="triton")
    assert c.triton == 3
    assert [int(st["step"]) for st in sts] == [2, 2, 1, 1]
    for k in range(4):
        assert torch.equal(ws[k], ws1[k]), k
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sts[k][key], sts1[k][key]), (k, key)


def test_backproj_grouped_refuses_ragged_lists():
    ws, us, ss, vs = _backproj_inputs([(5, 6, 2, 3)] * 2, torch.float32, 0)
    with pytest.raises(ValueError, match="one entry per weight"):
        subspace_backproj_step_grouped_(ws, us[:1], ss, vs, BACKPROJ_HYPERS["sgd"], [{}, {}])


# ---- the projected step of a model with a transformer's layer structure -------------------------

class _Block(torch.nn.Module):
    """q, k, v, o (h x h), gate / up (m x h), down (h x m), two RMSNorms: the layouts of a Llama
    decoder layer (the mixing between tokens does not matter here)."""

    def __init__(self, h, m):
        super().__init__()
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.n1, self.n2 = torch.nn.RMSNorm(h), torch.nn.RMSNorm(h)
        self.q, self.k, self.v, self.o = lin(h, h), lin(h, h), lin(h, h), lin(h, h)
        self.gate, self.up, self.down = lin(h, m), lin(h, m), lin(m, h)

    def forward(self, x):
        y = self.n1(x)
        x = x + self.o(torch.tanh(self.q(y)) * torch.sigmoid(self.k(y)) + self.v(y))
        y = self.n2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(y)) * self.up(y))


class _TinyLM(torch.nn.Module):
    def __init__(self, layers, h=16, m=24, vocab=20):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, h)
        self.blocks = torch.nn.ModuleList(_Block(h, m) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(h)
        self.head = torch.nn.Linear(h, vocab, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def _projected_step_launches(layers, rank=2, steps=2):
    """Launches of the DP part (end-of-backward clipper + optimizer step) of the last of `steps`
    projected steps, every Linear projected at `rank`, AdamW, Triton kernels."""
    from dpkern.subspace import SubspacePrivacyEngine
    torch.manual_seed(0)
    model = _TinyLM(layers).to(DEV)
    gen = torch.Generator().manual_seed(1)
    bases = {n: (_orth(m.weight.shape[0], rank, gen), _orth(m.weight.shape[1], rank, gen))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    model, dp, _ = SubspacePrivacyEngine(accountant="rdp", backend="triton").make_private(
        module=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        data_loader=None, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2,
        sample_rate=0.01, loss_reduction="sum", subspace=bases, seed=0)
    dp.backproj_backend = dp.noise_backend = "triton"
    ids = torch.randint(0, 20, (2, 7), generator=gen).to(DEV)
    _alloc.set_poison(False)  # its NaN fills are launches of the tests, not of the step
    try:
        counted = dp_part_launches(dp, lambda: torch.nn.functional.cross_entropy(
            model(ids).reshape(-1, 20), ids.reshape(-1), reduction="none").view(2, -1).mean(1).sum(),
            steps)
    finally:
        _alloc.set_poison(True)
    assert dp.last_backproj and len(dp.bases) == 7 * layers + 1
    return counted


def test_launches_per_projected_step_pinned():
    """7 projected Linear weights per layer + the head, in 4 layouts of one rank: the projection
    is 4 launches + 1 reduce, the back-projection 4 launches, whatever the number of layers; a
    further layer adds only its two norm weights' own launches (norm, bound, noise + update:
    3 per weight), not one per projected weight. Measured (CPU, no poisoning): backward 76 + 4
    per layer, step 11 + 2 per layer; per-layer projection and back-projection launches were
    2 + 1 more per projected weight (21 per layer), plus 18 for last_clip and 8 for the norm
    weights' sums. The fixed part's pin leaves a little slack for the engine's share."""
    b1, s1 = _projected_step_launches(1)
    b3, s3 = _projected_step_launches(3)
    for b in (b1, b3):
        assert b.by_name["triton:_subspace_proj_fwd_kernel"] == 4
        assert b.by_name["triton:_subspace_proj_reduce_kernel"] == 1
    for s in (s1, s3):
        assert s.by_name["triton:_subspace_backproj_fwd_kernel"] == 4
        assert s.by_name["triton:_gaussian_segments_kernel"] == 1
    per_layer = (b3.total + s3.total - b1.total - s1.total) / 2
    assert per_layer <= 6, (b1, s1, b3, s3)  # 7 projected weights per layer: per-layer launches fail
    assert b1.total + s1.total <= 100, (b1, s1, b3, s3)


def test_tabled_kernels_load_as_wide_as_single_layer():
    """sm_90 PTX (compiled on any machine): the tabled projection and back-projection read their
    operands with the single-layer kernels' instructions, plus the table reads (ld.v1.b64)."""
    from tests.sm90_ptx import tabled_load_counts
    counts = tabled_load_counts(["proj", "backproj"])
    assert set(counts) == {"proj", "backproj"}
    for name, c in counts.items():
        single, table = dict(c["single"]), dict(c["table"])
        assert 1 <= table.pop("ld.v1.b64", 0) - single.pop("ld.v1.b64", 0) <= 6, (name, c)
        assert table == single, (name, c)
        assert single.get("cp.async.16", 0) > 0, (name, c)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_grouped_step_does_not_synchronise(dtype, monkeypatch):
    """Three projected layers of one layout (tabled launches) and one of another: the third step
    runs under the sync guard with the pointer-table cache emptied (the tables are uploaded
    again, pinned and non-blocking); the weights then match the per-layer path's (the same
    kernels without tables) to fp32 rounding of the update."""
    from dpkern.kernels import _tables as tables
    from dpkern.subspace import SubspacePrivacyEngine
    from tests.conftest import sync_is_an_error

    def run(grouped):
        monkeypatch.setenv("DPKERN_SUBSPACE_GROUPED", "1" if grouped else "0")
        torch.manual_seed(0)
        layers = [torch.nn.Linear(64, 64) for _ in range(3)] + [torch.nn.Linear(64, 32)]
        model = torch.nn.Sequential(*[m for lin in layers for m in (lin, torch.nn.Tanh())]).cuda()
        gen = torch.Generator().manual_seed(1)
        bases = {str(2 * k): (_orth(lin.weight.shape[0], 8, gen), _orth(64, 8, gen))
                 for k, lin in enumerate(layers)}
        model, dp, _ = SubspacePrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
            data_loader=None, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
            sample_rate=0.01, loss_reduction="sum", subspace=bases, seed=0)
        x = torch.randn(4, 63, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
        x[1] = float("nan")
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        for step in range(3):
            with amp:
                loss = model(x).float().square().mean(dim=(1, 2)).nan_to_num().sum()
            if step == 2 and grouped:
                tables._TABLES.clear()
            with sync_is_an_error() if step == 2 else contextlib.nullcontext():
                loss.backward()
                dp.step()
                dp.zero_grad()
        assert dp.last_backproj and dp.nonfinite_samples == 3
        return [p.detach().float().clone() for p in model.parameters()]

    import contextlib
    grouped, per_layer = run(True), run(False)
    for a, b in zip(grouped, per_layer):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)
