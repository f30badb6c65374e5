"""The fused noise + optimizer path of DPOptimizer (dpkern.noise): the same update as the
materialised path with the same z (σ > 0), the plain torch optimizer (σ = 0), LR schedulers,
resume without replaying or skipping noise, empty batches noised, and when it is (not) used."""
import copy

import pytest
import torch
from torch import nn

from dpkern import PrivacyEngine

OPTS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01,
                                                  nesterov=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
    "adam_wd0": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.LayerNorm(9), nn.Linear(9, 4))


def _private(model, make_opt, sigma, seed=5, c=0.7, **kw):
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model, dp, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=None, noise_multiplier=sigma, max_grad_norm=c,
        expected_batch_size=4, sample_rate=0.1, seed=seed, **kw)
    return model, dp, sched


def _train(model, dp, sched, steps, fused, data_seed=0, empty_at=()):
    dp.fused = fused
    g = torch.Generator().manual_seed(data_seed)
    for k in range(steps):
        x, y = torch.randn(4, 6, generator=g), torch.randint(0, 4, (4,), generator=g)
        if k in empty_at:
            dp.signal_empty_batch()
        else:
            nn.functional.cross_entropy(model(x), y).backward()
        dp.step()
        dp.zero_grad()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_fused_equals_materialised_same_noise(opt, sigma):
    runs = []
    for fused in (True, False):
        model, dp, sched = _private(_model(), OPTS[opt], sigma)
        assert dp.fused_available()
        runs.append(_train(model, dp, sched, 4, fused, empty_at=(2,)))
        assert dp.noise_steps == 4 and dp.noise_generator.step == 4
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if sigma > 0:  # the noise is really there: a different key moves the weights differently
        model, dp, sched = _private(_model(), OPTS[opt], sigma, seed=6)
        other = _train(model, dp, sched, 4, True, empty_at=(2,))
        assert any(not torch.allclose(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("opt", ["sgd_momentum_wd", "adamw"])
def test_fused_sigma0_equals_plain_optimizer(opt):
    """σ = 0 and a C no sample reaches: the fused DP step is the plain torch optimizer's step on
    the mean gradient (B = B_expected), LR scheduler included."""
    ref = _model()
    ref_opt = OPTS[opt](ref.parameters())
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(4, 6, generator=g), torch.randint(0, 4, (4,), generator=g)
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
    model, dp, sched = _private(_model(), OPTS[opt], 0.0, c=1e9)
    got = _train(model, dp, sched, 3, True)
    assert all(p.grad is None for p in model.parameters())  # nothing materialised
    for a, b in zip(got, ref.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_resume_neither_replays_nor_skips_noise():
    model, dp, sched = _private(_model(), OPTS["adamw"], 1.0)
    full = _train(model, dp, sched, 4, True)
    model, dp, sched = _private(_model(), OPTS["adamw"], 1.0)
    _train(model, dp, sched, 2, True)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": dp.state_dict(),
                          "sched": sched.state_dict()})
    assert ckpt["opt"]["dpkern"]["noise"]["step"] == 2
    model2, dp2, sched2 = _private(_model(), OPTS["adamw"], 1.0)
    model2.load_state_dict(ckpt["model"])
    dp2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the same data stream as the uninterrupted run
        torch.randn(4, 6, generator=g), torch.randint(0, 4, (4,), generator=g)
    dp2.fused = True
    for _ in range(2):
        x, y = torch.randn(4, 6, generator=g), torch.randint(0, 4, (4,), generator=g)
        nn.functional.cross_entropy(model2(x), y).backward()
        dp2.step()
        dp2.zero_grad()
        sched2.step()
    for a, b in zip(full, model2.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    assert dp2.noise_generator.step == 4
    with pytest.raises(ValueError, match="replay"):  # going back on the same key is refused
        dp2.load_state_dict(ckpt["opt"])


def test_checkpoint_of_other_calibration_refused():
    model, dp, _ = _private(_model(), OPTS["sgd"], 1.0)
    sd = dp.state_dict()
    _, dp2, _ = _private(_model(), OPTS["sgd"], 2.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp2.load_state_dict(sd)


def test_empty_batch_is_noised_on_the_fused_path():
    model, dp, sched = _private(_model(), OPTS["sgd"], 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, dp, sched, 1, True, empty_at=(0,))
    assert all((p.detach() != b).all() for p, b in zip(model.parameters(), before))


def test_unfused_when_postprocessors_other_optimizers_or_overridden_noise():
    model, dp, _ = _private(_model(), OPTS["sgd"], 1.0, grad_postprocessors=[lambda g, s: None])
    assert not dp.fused_available()
    _, dp, _ = _private(_model(), lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1), 1.0)
    assert not dp.fused_available()
    _, dp, _ = _private(_model(), lambda ps: torch.optim.RMSprop(ps, lr=1e-2), 1.0)
    assert not dp.fused_available()
    _, dp, _ = _private(_model(), OPTS["adamw"], 1.0)
    assert dp.fused_available()


@pytest.mark.parametrize("opt", ["adamw", "sgd_momentum_wd"])
def test_bf16_switching_between_fused_and_unfused(opt):
    """The fused step keeps fp32 states for bf16 parameters, torch's step bf16 ones: switching
    either way mid-run works (states rounded to bf16 for torch, widened exactly for the kernel) and
    tracks an all-fused run to bf16 rounding of the states."""
    def run(pattern):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 4)).to(torch.bfloat16)
        dp = OPTS[opt](model.parameters())
        model, dp, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=dp, data_loader=None, noise_multiplier=0.5, max_grad_norm=1.0,
            expected_batch_size=4, sample_rate=0.1, seed=3, loss_reduction="sum",
            average_sum=True)
        g = torch.Generator().manual_seed(1)
        for fused in pattern:
            dp.fused = fused
            model(torch.randn(4, 6, generator=g).to(torch.bfloat16)).float().pow(2).sum().backward()
            dp.step()
            dp.zero_grad()
            for k, v in dp.state[model[0].weight].items():
                if k != "step":
                    assert v.dtype == (torch.float32 if fused else torch.bfloat16), k
        return [p.detach().float() for p in model.parameters()]
    mixed = run([True, False, True, False, True])
    fused = run([True] * 5)
    for a, b in zip(mixed, fused):
        # a few bf16 ulps of the weights (|w| < 1): states rounded to bf16 twice on the way
        assert (a - b).abs().max().item() <= 4 * 2.0 ** -8, (a - b).abs().max()
