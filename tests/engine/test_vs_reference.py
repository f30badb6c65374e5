"""One DP step (σ = 0, SGD lr = 1) moves each weight by −(1/B) Σ_i clip(∇ℓ_i), vs a per-sample
float64 reference, for every model, B ∈ {1, 5} and every clipping mode (within 1e-5 relative).
The clip uses the engine's per-sample upper bounds U_i (dpkern/layers/bounds.py), which the
reference first checks against the exact fp64 norms (≥ them, and at most 5% looser)."""
import copy

import pytest
import torch

from dpkern import PrivacyEngine
from dpkern.losses import per_sample_losses
from tests.engine import _models
from tests.engine._reference import clipped_mean, per_sample_grads, total_norms

MODES = ("flat", "per_layer", "automatic")
_CACHE = {}


def _case(name, bsz):
    if (name, bsz) not in _CACHE:
        model = _models.build(name)
        batch = _models.batch_for(name, bsz, seed=bsz)
        psg = per_sample_grads(model, batch)
        _CACHE[(name, bsz)] = (model, batch, psg)
    return _CACHE[(name, bsz)]


def dp_update(model, batch, clipping, c, bsz, **kw):
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    engine = PrivacyEngine(accountant="rdp")
    model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=None,
                                        noise_multiplier=0.0, max_grad_norm=c, clipping=clipping,
                                        expected_batch_size=bsz, sample_rate=0.01, **kw)
    opt.fused = False  # materialised path: p.grad holds the released gradient
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in named}
    per_sample_losses(model, batch).mean().backward()
    opt.step()
    # SGD(lr=1) moved each weight by -p.grad (the released gradient); the difference of fp32
    # weights only shows it to eps(fp32)·|w|, so compare p.grad and check the move separately.
    for n, p in named:
        moved = before[n] - p.detach()
        slack = 2 * torch.finfo(torch.float32).eps * (before[n].abs() + p.grad.abs()) + 1e-30
        assert ((moved - p.grad).abs() <= slack).all(), n
    return {n: p.grad.detach().clone() for n, p in named}, {n: u for n, (_, u) in opt.last_clip.items()}


def assert_updates_close(got: dict, want: dict, rtol: float = 1e-5):
    assert got.keys() == want.keys()
    scale = torch.sqrt(sum(w.square().sum() for w in want.values()))
    assert scale > 0
    for n in want:
        err = (got[n].double() - want[n]).norm()
        # per tensor: relative to itself, with a floor relative to the whole update
        bound = rtol * max(want[n].norm().item(), 1e-3 * scale.item())
        assert err <= bound, f"{n}: |Δ - ref| = {err:.3e} > {bound:.3e} (|ref| = {want[n].norm():.3e})"


@pytest.mark.parametrize("bsz", [1, 5])
@pytest.mark.parametrize("name", list(_models.MODELS))
def test_one_step_matches_per_sample_reference(name, bsz):
    model, batch, psg = _case(name, bsz)
    norms = total_norms(psg)
    # A threshold that clips some samples and not others (B = 1: clipped).
    c = float(norms.median()) if bsz > 1 else 0.5 * float(norms[0])
    assert (norms > c).any() and (bsz == 1 or (norms <= c).any())
    for clipping in MODES:
        got, bounds = dp_update(model, batch, clipping, c, bsz)
        assert_updates_close(got, clipped_mean(psg, clipping, c, bsz, bounds=bounds))


def test_tied_weights_are_one_parameter_with_cross_term():
    model, batch, psg = _case("gpt2", 5)
    assert model.lm_head.weight is model.transformer.wte.weight
    # Without the cross term the norms (and so the clip factors) would differ: check it matters.
    c = float(total_norms(psg).median())
    got, bounds = dp_update(model, batch, "flat", c, 5)
    assert_updates_close(got, clipped_mean(psg, "flat", c, 5, bounds=bounds))
