"""B = 1 backward passes take the one-gradient path (form G once, norm of the released fp32 values,
scale in place). It must release what the general path releases, within fp32 rounding, bound every
release by C, zero a non-finite sample, and accumulate over micro-batches of one."""
import copy

import pytest
import torch
from torch import nn

from dpkern import PrivacyEngine
from dpkern.engine import _Clipper


class Tied(nn.Module):
    """Embedding + Linear + LayerNorm + a head tied to the embedding: every use kind."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.norm(torch.tanh(self.lin(self.emb(ids)))))


def _released(model, ids, fast, clipping="flat", c=0.05, scale=1.0, micro=1, backend=None):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt, _ = PrivacyEngine(accountant="rdp", backend=backend).make_private(
        module=model, optimizer=opt, data_loader=None, noise_multiplier=0.0,
        max_grad_norm=c if clipping != "per_layer" else [c] * 5, clipping=clipping,
        expected_batch_size=1, sample_rate=0.1, loss_reduction="sum")
    opt.fused = False
    old = _Clipper.single_sample_fast
    _Clipper.single_sample_fast = fast
    try:
        for k in range(micro):
            out = model(ids[k:k + 1])
            (out.square().sum() * scale).backward()
    finally:
        _Clipper.single_sample_fast = old
    grads = {n: opt.summed[p].double().clone() for p, n in opt.params.items()}
    return grads, opt


def _clip_exact(grads, clipping, c, gamma=0.01):
    """The exact clipped release of one sample from its (unclipped) gradient, fp64."""
    if clipping == "per_layer":
        return {n: g * min(1.0, c / float(g.norm())) for n, g in grads.items()}
    total = float(sum(g.square().sum() for g in grads.values()).sqrt())
    f = min(1.0, c / total) if clipping == "flat" else c / (total + gamma)
    return {n: g * f for n, g in grads.items()}


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e6])  # unclipped, clipped, far above C
def test_single_sample_path_is_the_exact_clip(clipping, scale):
    """The fast path's bound is the norm of the released fp32 values (relative slack ~1e-7), so its
    release is the exact clip to fp32 rounding; the general path's proven bound also covers the
    kernels' error terms and clips up to ~1e-4 more. Both stay within C."""
    torch.manual_seed(0)
    model = Tied()
    ids = torch.randint(0, 11, (1, 63))
    fast, _ = _released(model, ids, True, clipping, scale=scale)
    slow, _ = _released(model, ids, False, clipping, scale=scale)
    raw, _ = _released(model, ids, True, "flat", c=1e30, scale=scale)  # unclipped gradient
    want = _clip_exact(raw, clipping, 0.05)
    for n in want:
        torch.testing.assert_close(fast[n], want[n], rtol=1e-5, atol=1e-12 * max(scale, 1.0))
        torch.testing.assert_close(slow[n], want[n], rtol=1e-3, atol=1e-12 * max(scale, 1.0))
    total = float(sum(g.square().sum() for g in fast.values()).sqrt())
    if clipping == "flat":
        assert total <= 0.05  # the release never exceeds C
        if scale >= 1.0:
            assert total > 0.05 * (1 - 1e-6)  # ...and a clipped sample sits at C: not vacuous
    if clipping == "per_layer":
        assert all(float(g.norm()) <= 0.05 for g in fast.values())


def test_single_sample_nonfinite_is_zeroed_and_counted():
    torch.manual_seed(1)
    model = Tied()
    ids = torch.randint(0, 11, (1, 9))
    fast, opt = _released(model, ids, True, scale=float("inf"))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in fast.values())
    assert opt.nonfinite_samples == 1


def test_single_sample_micro_batches_accumulate():
    torch.manual_seed(2)
    model = Tied()
    ids = torch.randint(0, 11, (3, 17))
    fast, opt = _released(model, ids, True, micro=3)
    parts = [_clip_exact(_released(model, ids[k:k + 1], True, "flat", c=1e30)[0], "flat", 0.05)
             for k in range(3)]
    for n in fast:
        torch.testing.assert_close(fast[n], sum(p[n] for p in parts), rtol=1e-5, atol=1e-12)
    assert opt.backwards == 3 and opt.samples == 3


class TwoLinear(nn.Module):
    """Two Linear layers of one layout (one grouped launch), a LayerNorm and a tied head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin1 = nn.Linear(6, 6)
        self.lin2 = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.norm(self.lin2(torch.tanh(self.lin1(self.emb(ids))))))


def _bf16_release(monkeypatch=None, per_item=False):
    """One B = 1 backward of TwoLinear in bf16 on the Triton backend (on the GPU when there is
    one): the released sums and the
    launches of the backward; per_item: the engine's grouped book-keeping replaced by one
    bookkeeping_wgrad per item (what the path did before it was grouped)."""
    import dpkern.engine as eng
    from dpkern.ops.bookkeeping import bookkeeping_wgrad
    from tests.opcount import count_launches
    if per_item:
        monkeypatch.setattr(eng, "bookkeeping_wgrad_grouped", lambda items, backend=None, **kw: [
            bookkeeping_wgrad(a, g, s, backend=backend) for a, g, s, _, _ in items])
    from tests.conftest import HAS_GPU
    dev = "cuda" if HAS_GPU else "cpu"  # the CPU runs the kernels in Triton's interpreter
    torch.manual_seed(3)
    model = TwoLinear().to(dev, torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt, _ = PrivacyEngine(accountant="rdp", backend="triton").make_private(
        module=model, optimizer=opt, data_loader=None, noise_multiplier=0.0, max_grad_norm=0.05,
        expected_batch_size=1, sample_rate=0.1, loss_reduction="sum")
    ids = torch.randint(0, 11, (1, 63)).to(dev)
    out = model(ids)
    with count_launches() as c:
        (out.float().square().sum() * 100.0).backward()
    return {n: opt.summed[p].cpu() for p, n in opt.params.items()}, c


def test_single_sample_groups_16bit_linear_gradients(monkeypatch):
    """B = 1 with 16-bit Linear layers: the one-use layers' gradients come from grouped
    book-keeping launches (lin1 and lin2 in one, the tied head's on its own: 2 launches, not 3),
    bit for bit what one launch per layer gives, and the release stays within C."""
    grouped, c = _bf16_release()
    assert c.by_name["triton:_bookkeeping_fwd_kernel"] == 2, c.by_name
    # the norms and the scaling of all 7 gradients: one launch pair and one launch
    assert c.by_name["triton:_sumsq_chunks_kernel"] == 1, c.by_name
    assert c.by_name["triton:_sumsq_finish_kernel"] == 1, c.by_name
    assert c.by_name["triton:_scale_chunks_kernel"] == 1, c.by_name
    with monkeypatch.context() as m:
        single, c1 = _bf16_release(m, per_item=True)
    assert c1.by_name["triton:_bookkeeping_fwd_kernel"] == 3, c1.by_name
    assert grouped.keys() == single.keys() and len(grouped) == 7
    for n in grouped:
        assert torch.equal(grouped[n], single[n]), n
    total = float(sum(g.double().square().sum() for g in grouped.values()).sqrt())
    assert 0.05 * (1 - 1e-6) < total <= 0.05


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_single_sample_triton_norms_and_scaling_match_torch(clipping):
    """The Triton backend's one-launch norms (fp64 sums in another order) and scaling release what
    the torch backend's per-tensor ones release, to fp32 rounding, in one backward and over
    micro-batches; a clipped sample sits at C and not above."""
    from tests.conftest import HAS_GPU
    dev = "cuda" if HAS_GPU else "cpu"
    torch.manual_seed(4)
    model = Tied().to(dev)
    ids = torch.randint(0, 11, (2, 63)).to(dev)
    tri, opt = _released(model, ids, True, clipping, scale=10.0, micro=2, backend="triton")
    ref, _ = _released(model, ids, True, clipping, scale=10.0, micro=2, backend="torch")
    for n in ref:
        torch.testing.assert_close(tri[n], ref[n], rtol=1e-6, atol=1e-12)
    assert opt.backwards == 2 and opt.samples == 2
    one, _ = _released(model, ids, True, clipping, scale=10.0, backend="triton")
    if clipping == "flat":
        total = float(sum(g.square().sum() for g in one.values()).sqrt())
        assert 0.05 * (1 - 1e-6) < total <= 0.05
    else:
        norms = [float(g.norm()) for g in one.values()]
        assert all(n <= 0.05 for n in norms)  # C_k = C each (a list)
        assert any(n > 0.05 * (1 - 1e-6) for n in norms)  # clipped ones sit at C_k
