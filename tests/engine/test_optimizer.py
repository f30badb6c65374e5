"""The DP optimizer wrapper: any torch optimizer, post-processors, non-finite samples, "sum"
reduction, no autograd weight gradients; the per-sample loss helpers."""
import copy

import pytest
import torch
from torch import nn

from dpkern import PrivacyEngine
from dpkern.losses import causal_lm_per_sample_loss, per_sample_losses
from tests.engine import _models
from tests.engine._reference import total_bounds


def _make(model, opt, **kw):
    args = dict(module=model, optimizer=opt, data_loader=None, noise_multiplier=0.0,
                max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.1)
    args.update(kw)
    model, opt, loader = PrivacyEngine(accountant="rdp").make_private(**args)
    opt.fused = False  # materialised path: p.grad holds the released gradient
    return model, opt, loader


def _clipped_sum(model, x, y, c, opt=None, skip=0):
    """Σ_i clip(∇ℓ_i) by per-sample backward passes (fp64). With opt (a DPOptimizer after its
    backward): clip by the engine's bounds U_i (checked ≥ the exact norm, and tight) as it does;
    `skip` leading samples of the engine's batch are not in x."""
    ref = copy.deepcopy(model).double()
    out = [torch.zeros_like(p) for p in ref.parameters()]
    bounds = total_bounds(opt.last_clip)[skip:] if opt is not None else None
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(ref(x[i:i + 1].double()), y[i:i + 1])
        gs = torch.autograd.grad(loss, list(ref.parameters()))
        n = torch.sqrt(sum(g.square().sum() for g in gs))
        if bounds is not None:
            assert n * (1 - 1e-5) <= bounds[i] <= n * 1.01 + 1e-12, (i, n, bounds[i])
            n = bounds[i]
        f = min(1.0, c / n.item()) if torch.isfinite(n) else 0.0
        for o, g in zip(out, gs):
            o += f * g if f else 0
    return out


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_any_torch_optimizer_sees_the_clipped_mean(opt_cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    ref_model = copy.deepcopy(model)
    ref_opt = opt_cls(ref_model.parameters(), lr=0.01)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    model, dp_opt, _ = _make(model, opt_cls(model.parameters(), lr=0.01), max_grad_norm=0.3)
    sched = torch.optim.lr_scheduler.StepLR(dp_opt, step_size=1, gamma=0.5)
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        want = [w / 4 for w in _clipped_sum(ref_model, x, y, 0.3, dp_opt)]
        dp_opt.step()
        for p, w in zip(model.parameters(), want):
            torch.testing.assert_close(p.grad.double(), w, rtol=1e-5, atol=1e-8)
        dp_opt.zero_grad()
        sched.step()
        for rp, w in zip(ref_model.parameters(), want):  # the plain optimizer, same gradient
            rp.grad = w.float()
        ref_opt.step()
        ref_sched.step()
        for p, rp in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, rp, rtol=1e-5, atol=1e-6)
    assert dp_opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 3)
    sd = dp_opt.state_dict()
    assert sd["dpkern"]["noise_steps"] == 3
    dp_opt.load_state_dict(sd)


def test_postprocessors_see_noisy_averaged_grads_in_place():
    model = nn.Linear(4, 3)
    seen = {}

    def halve(grads, noise_std):
        seen["std"] = noise_std
        seen["names"] = sorted(grads)
        for g in grads.values():
            g.mul_(0.5)

    model, opt, _ = _make(model, torch.optim.SGD(model.parameters(), lr=1.0),
                          noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=8,
                          grad_postprocessors=[halve], seed=0)
    model(torch.randn(8, 4)).sum().backward()
    summed = {id(p): opt.summed[p].clone() for p in model.parameters()}
    opt.step()
    assert seen["std"] == pytest.approx(2.0 * 0.5 / 8) and seen["names"] == ["bias", "weight"]
    # the released gradient is half of (sum + noise) / 8, and the noise is there
    for p in model.parameters():
        assert not torch.allclose(p.grad, 0.5 * summed[id(p)] / 8)


def test_nonfinite_sample_is_zeroed_and_counted():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 3))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    ref = copy.deepcopy(model)
    x[0, 2] = float("inf")
    model, opt, _ = _make(model, torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=0.5)
    nn.functional.cross_entropy(model(x), y, reduction="none").mean().backward()
    want = [w / 4 for w in _clipped_sum(ref, x[1:], y[1:], 0.5, opt, skip=1)]
    opt.step()
    assert opt.nonfinite_samples == 1
    for p, w in zip(model.parameters(), want):
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad.double(), w, rtol=1e-5, atol=1e-8)


def test_sum_reduction_is_not_divided():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 3))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    ref = copy.deepcopy(model)
    model, opt, _ = _make(model, torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=0.5,
                          loss_reduction="sum")
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    want = _clipped_sum(ref, x, y, 0.5, opt)
    opt.step()
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad.double(), w, rtol=1e-5, atol=1e-8)


def test_autograd_never_writes_private_weight_grads():
    model = _models.build("gpt2")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, _ = _make(model, opt)
    per_sample_losses(model, _models.batch_for("gpt2", 3)).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert opt.backwards == 1 and len(opt.summed) == len(list(model.parameters()))


def test_frozen_params_are_skipped():
    model = _models.build("lora_llama")
    private = [n for n, p in model.named_parameters() if p.requires_grad]
    assert private and all("lora_" in n for n in private)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt, _ = _make(model, opt)
    assert sorted(opt.params.values()) == sorted(private)


def test_causal_lm_loss_is_per_sequence_and_hf_loss_couples_samples():
    model = _models.build("llama")
    batch = _models.batch_for("llama", 3, seed=4)
    per = per_sample_losses(model, batch)
    for i in range(3):  # each sample's loss depends on that sample only
        alone = per_sample_losses(model, {k: v[i:i + 1] for k, v in batch.items()})
        torch.testing.assert_close(per[i], alone[0], rtol=1e-5, atol=1e-6)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    hf = model(**batch, labels=labels).loss  # token mean over the whole batch
    tokens = (labels[:, 1:] != -100).sum(1).float()
    torch.testing.assert_close(hf, (per * tokens).sum() / tokens.sum(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hf, per.mean())  # lengths differ: not a mean of per-sample losses
    logits = torch.zeros(2, 4, 10)
    torch.testing.assert_close(causal_lm_per_sample_loss(logits, torch.ones(2, 4, dtype=torch.long)),
                               torch.full((2,), 2.302585), rtol=1e-5, atol=1e-6)
