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


def _run(model, batch, c, weights, sigma=0.0, fused=False):
    m = copy.deepcopy(model).to(weights)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m, opt, _ = PrivacyEngine(accountant="rdp").make_private(
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
