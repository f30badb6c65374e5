"""bf16 autocast and bf16 weights on a tiny Llama, against the float64 per-sample reference.

Tolerance (tests/tolerance.py policy, with flash-attention's rule that a low-precision path may err
at most twice as much as PyTorch's own same-dtype computation): with C out of reach (no clipping),
relative error of the DP gradient vs the fp64 mean gradient ≤ 2 × that of plain autograd under the
same autocast and weights, + 4·OUTPUT_EPS[bf16]; with clipping, ≤ 4·OUTPUT_EPS[bf16] per tensor
(norms and factors are fp32 of bf16 operands, whose rounding the fp64 reference does not see).
Under autocast fp32 parameters get fp32 gradients, book-kept into fp32 accumulators."""
import copy

import pytest
import torch

from dpkern import PrivacyEngine
from dpkern.losses import per_sample_losses
from tests.engine import _models
from tests.conftest import HAS_GPU
from tests.engine._reference import clipped_mean, per_sample_grads, total_norms
from tests.tolerance import OUTPUT_EPS

BF16_RTOL = 4 * OUTPUT_EPS[torch.bfloat16]
_CASE = {}


def _case():
    if not _CASE:
        model = _models.build("llama")
        batch = _models.batch_for("llama", 4, seed=3)
        _CASE.update(model=model, batch=batch, psg=per_sample_grads(model, batch))
    return _CASE["model"], _CASE["batch"], _CASE["psg"]


def _run(model, batch, c, weights, sigma=0.0, fused=False, backend=None):
    m = copy.deepcopy(model).to(weights)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m, opt, _ = PrivacyEngine(accountant="rdp", backend=backend).make_private(
        module=m, optimizer=opt, data_loader=None, noise_multiplier=sigma, max_grad_norm=c,
        expected_batch_size=4, sample_rate=0.1, seed=0, loss_reduction="sum")
    opt.fused = fused
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 + 'mean' is refused (sensitivity)
        loss = per_sample_losses(m, batch).sum()
    loss.backward()
    assert all(acc.dtype == torch.float32 for acc in opt.summed.values())
    assert all(s.dtype == torch.float32 for s in opt.last_scales.values())
    opt.step()
    # 'sum': p.grad is the clipped sum; / 4 (exact) gives the mean the references hold
    return m, {n: None if p.grad is None else p.grad / 4 for n, p in m.named_parameters()}


def _rel(got, want):
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_autocast_unclipped_within_twice_torch_error(weights):
    model, batch, psg = _case()
    want = {n: g.mean(0) for n, g in psg.items()}
    plain = copy.deepcopy(model).to(weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = per_sample_losses(plain, batch).mean()
    loss.backward()
    _, got = _run(model, batch, 1e9, weights)
    for n, p in plain.named_parameters():
        assert got[n].dtype == weights
        torch_err = _rel(p.grad, want[n])
        assert _rel(got[n], want[n]) <= 2 * torch_err + BF16_RTOL, n


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_autocast_clipped_matches_reference(weights):
    model, batch, psg = _case()
    c = float(total_norms(psg).median())
    want = clipped_mean(psg, "flat", c, 4)
    _, got = _run(model, batch, c, weights)
    scale = torch.sqrt(sum(w.square().sum() for w in want.values()))
    for n in want:
        err = float((got[n].double() - want[n]).norm())
        assert err <= BF16_RTOL * max(float(want[n].norm()), 1e-2 * float(scale)), n


def test_autocast_fused_step_with_bf16_weights():
    """The fused update takes the fp32 clipped sum for bf16 weights (no bf16 rounding before the
    noise) and equals the materialised path."""
    model, batch, _ = _case()
    a, _ = _run(model, batch, 0.5, torch.bfloat16, sigma=1.0, fused=True)
    b, _ = _run(model, batch, 0.5, torch.bfloat16, sigma=1.0, fused=False)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, q, rtol=2 * OUTPUT_EPS[torch.bfloat16], atol=1e-3)


@pytest.mark.skipif(HAS_GPU, reason="interpreter run on CPU tensors; the GPU runs the kernels")
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_autocast_triton_engine_groups_layers_and_matches_torch(monkeypatch, clipping):
    """The Triton engine launches the norms, bounds and book-keeping of layers of one layout
    together (grouped launches, each layer with its own clip factors under per-layer clipping);
    its clipped gradients match the torch backend's (same operands, fp32 sums in other orders)."""
    import dpkern.kernels.bookkeeping as bk
    import dpkern.kernels.ghost_norm as gn
    import dpkern.kernels.row_norm_dots as rnd
    from tests.ops.test_grouped import _spy
    launches = {name: _spy(monkeypatch, mod, "_launch")
                for name, mod in (("norms", gn), ("bounds", rnd), ("bookkeeping", bk))}
    model, batch, psg = _case()
    c = float(total_norms(psg).median())
    got = {}
    for backend in ("triton", "torch"):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        n_params = sum(1 for p in m.parameters() if p.requires_grad)
        # per layer: C_k small enough that every layer is clipped, each by its own factor
        kw = dict(max_grad_norm=[c / n_params / 100] * n_params) if clipping == "per_layer" \
            else dict(max_grad_norm=c)
        m, opt, _ = PrivacyEngine(accountant="rdp", backend=backend).make_private(
            module=m, optimizer=opt, data_loader=None, noise_multiplier=0.0,
            expected_batch_size=4, sample_rate=0.1, seed=0, loss_reduction="sum",
            clipping=clipping, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            per_sample_losses(m, batch).sum().backward()
        got[backend] = {n: opt.summed[p].clone() for p, n in opt.params.items() if p in opt.summed}
    assert all(max(v) > 1 for v in launches.values()), launches   # layers shared launches
    for n, want in got["torch"].items():
        err = float((got["triton"][n].double() - want.double()).norm())
        assert err <= BF16_RTOL * max(float(want.norm()), 1e-6), n


def _recorded_uses(model, loss_of, monkeypatch):
    """Make a copy of `model` private, run one backward of loss_of(private model) under bf16
    autocast; return the private model and the uses the tape handed to the engine."""
    import dpkern.engine as eng
    seen = {}
    real = eng.norms_sq

    def spy(uses, params, **kw):
        seen.update({p: list(us) for p, us in uses.items()})
        return real(uses, params, **kw)

    monkeypatch.setattr(eng, "norms_sq", spy)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=m, optimizer=opt, data_loader=None, noise_multiplier=0.0, max_grad_norm=1.0,
        expected_batch_size=4, sample_rate=0.1, seed=0, loss_reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(m)
    loss.backward()
    return m, seen


def test_autocast_q_k_v_share_one_recorded_input(monkeypatch):
    """Autocast casts q/k/v's (gate/up's) common input once per layer; the tape keeps one of the
    equal copies, so the norms compute its Gram once (one launch for the group on a GPU)."""
    model, batch, _ = _case()
    m, uses = _recorded_uses(model, lambda m: per_sample_losses(m, batch).sum(), monkeypatch)
    for layer in m.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        q, k, v = (uses[x.weight][0].a for x in (att.q_proj, att.k_proj, att.v_proj))
        gate, up = (uses[x.weight][0].a for x in (mlp.gate_proj, mlp.up_proj))
        assert q is k is v and gate is up and q.dtype == torch.bfloat16
        assert q is not gate and uses[att.o_proj.weight][0].a is not q


class _TwoReads(torch.nn.Module):
    """Two Linear layers read x; between them x is changed in place (a new version)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.l1, self.l2, self.inplace = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3), inplace

    def forward(self, x):
        x = x * 1.0
        y1 = self.l1(x)
        if self.inplace:
            x.mul_(3.0)
        return (y1 + self.l2(x)).square().sum(dim=(1, 2))


@pytest.mark.parametrize("inplace", [False, True])
def test_autocast_shared_input_only_while_unchanged(monkeypatch, inplace):
    """A tensor changed in place between two reads is two inputs: each layer keeps its own copy,
    equal to what its matmul saw."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8)
    m, seen = _recorded_uses(_TwoReads(inplace), lambda m: m(x).sum(), monkeypatch)
    a1, a2 = seen[m.l1.weight][0].a, seen[m.l2.weight][0].a
    assert (a1 is a2) is not inplace
    torch.testing.assert_close(a1, x.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(a2, (x * (3.0 if inplace else 1.0)).to(torch.bfloat16), rtol=0, atol=0)


def test_autocast_casts_each_weight_once():
    """Under autocast every Linear weight is cast to bf16 once per step, in the forward, and the
    backward's grad_input GEMM reuses that copy (as autograd does without dpkern): a backward that
    casts the fp32 weight again fails this."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model, batch, _ = _case()
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=m, optimizer=opt, data_loader=None, noise_multiplier=0.0, max_grad_norm=1.0,
        expected_batch_size=4, sample_rate=0.1, seed=0, loss_reduction="sum")
    shapes = {tuple(mod.weight.shape) for mod in m.modules() if isinstance(mod, torch.nn.Linear)}
    n_linear = sum(isinstance(mod, torch.nn.Linear) for mod in m.modules())

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            x = args[0] if args else None
            if (func.overloadpacket.__name__ == "_to_copy" and isinstance(x, torch.Tensor)
                    and x.dtype == torch.float32 and tuple(x.shape) in shapes
                    and (kwargs or {}).get("dtype") == torch.bfloat16):
                self.n += 1
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with Casts() as fwd:
            loss = per_sample_losses(m, batch).sum()
    with Casts() as bwd:
        loss.backward()
    assert bwd.n == 0
    assert 0 < fwd.n <= n_linear + 2  # each weight once (plus any fp32 activation of one shape)
