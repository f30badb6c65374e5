"""DPOptimizer with grad_postprocessors on the fused path ("release"): one counter step, the noisy
release pass into the accumulators, the post-processors, then the noise-free fused update.

With an identity post-processor it takes that path (no torch optimizer step, p.grad stays None)
and gives the plain fused step's parameters bit for bit (Gaussian and LMO-DP, every fused
optimizer, an empty batch included) and the old materialised path's within fp32 rounding; a
post-processor that edits the gradients changes the update as it should; refusals leave the
counter alone; checkpoints with a stateful post-processor resume bit for bit; the subspace and
distributed optimizers, which call DPOptimizer.step, keep working."""
import copy

import pytest
import torch
from torch import nn

import dpkern
from dpkern import PrivacyEngine
from dpkern.denoise import RMTDenoiser
from dpkern.mechanisms import LMOMechanism, LMOParams
from tests.conftest import HAS_GPU
from tests.engine.test_fused_step import OPTS, _model

SIGMA, C, B = 1.3, 0.7, 4
# The old path (torch's optimizer on p.grad = (acc + σC z) / B) against the fused kernel: the
# same noise, fp32 rounding apart (acc.div_(B) vs acc * (1 / B), fma vs mul + add); the policy of
# tests/engine/test_fused_step.py's fused-vs-materialised comparison.
OLD_PATH_RTOL, OLD_PATH_ATOL = 1e-5, 1e-6


def _identity(grads, noise_std):
    pass


def _backends():
    return ["torch", "triton"] + (["auto"] if dpkern.cuda_available() else [])


def _private(make_opt, post, *, backend="torch", mechanism=None, seed=5, model=None,
             reduction="sum"):
    model = model if model is not None else _model()
    device = "cuda" if HAS_GPU and backend != "torch" else "cpu"
    model = model.to(device)
    model, dp, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=make_opt(model.parameters()), data_loader=None,
        noise_multiplier=None if mechanism else SIGMA, max_grad_norm=C, expected_batch_size=B,
        sample_rate=0.1, seed=seed, grad_postprocessors=post, mechanism=mechanism,
        loss_reduction=reduction)  # "mean" is refused on a GPU in tf32r mode (sensitivity)
    dp.noise_backend = None if backend == "auto" else backend
    return model, dp


def _train(model, dp, steps=4, empty_at=(2,), fused=True, path=None, reduction="sum"):
    """`steps` steps (an empty batch at empty_at); `path`: the step path every step must take."""
    dp.fused = fused
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    for k in range(steps):
        x, y = torch.randn(B, 6, generator=g), torch.randint(0, 4, (B,), generator=g)
        x, y = x.to(dev), y.to(dev)
        if k in empty_at:
            dp.signal_empty_batch()
        else:
            nn.functional.cross_entropy(model(x), y, reduction=reduction).backward()
        dp.step()
        if path is not None:
            assert dp.last_step_path == path
        if path in ("fused", "release"):
            assert all(p.grad is None for p in model.parameters())  # nothing materialised
        dp.zero_grad()
    assert dp.noise_steps == dp.noise_generator.step == steps  # one counter step per step
    return [p.detach().clone().cpu() for p in model.parameters()]


def _no_torch_step(dp):
    def refuse(*a, **k):
        raise AssertionError("the torch optimizer stepped")
    dp.original_optimizer.step = refuse


def _lmo():
    return LMOMechanism(LMOParams(), clip_norm=C, accounting="certified")


@pytest.mark.parametrize("mech", ["gaussian", "lmo"])
@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("backend", _backends())
def test_identity_postprocessor_equals_fused_step(backend, opt, mech):
    """Release + identity + noise-free update == the one-pass fused step, bit for bit."""
    mechanism = _lmo if mech == "lmo" else (lambda: None)
    model, dp = _private(OPTS[opt], None, backend=backend, mechanism=mechanism())
    fused = _train(model, dp, path="fused")
    model, dp = _private(OPTS[opt], [_identity], backend=backend, mechanism=mechanism())
    assert dp.fused_update_available() and not dp.fused_available()
    _no_torch_step(dp)
    released = _train(model, dp, path="release")
    for a, b in zip(fused, released):
        assert torch.equal(a, b)
    # and the noise is really there: another key moves the weights differently
    model, dp = _private(OPTS[opt], [_identity], backend=backend, mechanism=mechanism(), seed=6)
    assert any(not torch.equal(a, b) for a, b in zip(released, _train(model, dp)))


@pytest.mark.parametrize("opt", list(OPTS))
def test_release_path_equals_old_unfused_path(opt):
    """The materialised path (fused = False: torch's optimizer on p.grad) with the same
    post-processor: the same noise and update, to fp32 rounding."""
    model, dp = _private(OPTS[opt], [_identity])
    new = _train(model, dp, path="release")
    model, dp = _private(OPTS[opt], [_identity])
    old = _train(model, dp, fused=False, path="unfused")
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=OLD_PATH_RTOL, atol=OLD_PATH_ATOL)


def test_postprocessor_sees_the_released_gradients_and_its_edits_are_applied():
    """It gets {name: (Σ + σC z) / B} (fp32, the accumulators) and σC / B, as on the old path;
    what it writes is what plain SGD applies: p <- p - lr * grad."""
    seen = {}

    def record_and_edit(grads, noise_std):
        seen["std"] = noise_std
        seen["grads"] = {k: g.clone() for k, g in grads.items()}
        grads["0.weight"].zero_()         # in place
        grads["2.bias"] = torch.full_like(grads["2.bias"], 0.25)  # or replaced in the dict
        grads["2.weight"].mul_(-1.0)

    runs = {}
    for path, fused in (("release", True), ("unfused", False)):
        model, dp = _private(OPTS["sgd"], [record_and_edit], reduction="mean")  # CPU: allowed
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _train(model, dp, steps=1, empty_at=(), fused=fused, path=path, reduction="mean")
        assert seen["std"] == pytest.approx(SIGMA * C / B)
        runs[path] = (before, {n: p.detach().clone() for n, p in model.named_parameters()},
                      seen.pop("grads"))
    (before, after, grads), (_, after_old, grads_old) = runs["release"], runs["unfused"]
    for n in grads:  # the same released gradients as the materialised path, noise included
        torch.testing.assert_close(grads[n], grads_old[n], rtol=OLD_PATH_RTOL, atol=OLD_PATH_ATOL)
        assert grads[n].dtype == torch.float32
    lr = 0.1
    assert torch.equal(after["0.weight"], before["0.weight"])  # zeroed gradient: no move
    torch.testing.assert_close(after["2.bias"], before["2.bias"] - lr * 0.25, rtol=0, atol=1e-7)
    torch.testing.assert_close(after["2.weight"], before["2.weight"] + lr * grads["2.weight"],
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(after["0.bias"], before["0.bias"] - lr * grads["0.bias"],
                               rtol=0, atol=1e-7)
    for n in after:
        torch.testing.assert_close(after[n], after_old[n], rtol=OLD_PATH_RTOL, atol=OLD_PATH_ATOL)


def test_refused_step_leaves_the_counter_and_weights():
    model, dp = _private(OPTS["adamw"], [_identity])
    _train(model, dp, steps=1, empty_at=())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="without a new backward"):
        dp.step()
    assert dp.noise_generator.step == dp.noise_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unfused_paths_stay_unfused():
    """Optimizers the kernel cannot run and an overridden add_noise_ keep the materialised path."""
    model, dp = _private(lambda ps: torch.optim.RMSprop(ps, lr=1e-2), [_identity])
    assert not dp.fused_update_available()
    _train(model, dp, steps=2, empty_at=(), path="unfused")

    class Custom(type(dp)):
        def add_noise_(self, acc, std):
            super().add_noise_(acc, std)

    model, dp = _private(OPTS["adamw"], [_identity])
    dp.__class__ = Custom
    assert not dp.fused_update_available()
    _train(model, dp, steps=2, empty_at=(), path="unfused")


def _denoised_run(steps, ckpt_at=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 4))
    model, dp = _private(OPTS["adamw"], [RMTDenoiser(seed=0)], model=model)
    g = torch.Generator().manual_seed(1)
    out = None
    for k in range(steps):
        if k == ckpt_at:
            out = copy.deepcopy({"model": model.state_dict(), "opt": dp.state_dict()})
        x, y = torch.randn(B, 24, generator=g), torch.randint(0, 4, (B,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        dp.step()
        assert dp.last_step_path == "release"
        dp.zero_grad()
    return model, dp, out


def test_checkpoint_with_postprocessor_state_round_trips():
    """state_dict / load_state_dict on the release path: the noise counter and RMTDenoiser's warm
    start resume, so the resumed run equals the uninterrupted one bit for bit (CPU)."""
    full, _, ckpt = _denoised_run(5, ckpt_at=3)
    assert ckpt["opt"]["dpkern"]["noise"]["step"] == 3
    assert ckpt["opt"]["dpkern"]["postprocessors"][0]["calls"] == 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 4))
    den = RMTDenoiser(seed=0)
    model, dp = _private(OPTS["adamw"], [den], model=model)
    model.load_state_dict(ckpt["model"])
    dp.load_state_dict(ckpt["opt"])
    assert den.calls == 3 and dp.noise_generator.step == 3
    g = torch.Generator().manual_seed(1)
    for k in range(5):
        x, y = torch.randn(B, 24, generator=g), torch.randint(0, 4, (B,), generator=g)
        if k < 3:
            continue  # the same data stream as the uninterrupted run
        nn.functional.cross_entropy(model(x), y).backward()
        dp.step()
        dp.zero_grad()
    for a, b in zip(full.parameters(), model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="replay"):  # going back on the same key is refused
        dp.load_state_dict(ckpt["opt"])


@pytest.mark.parametrize("backproj", [True, False])
def test_subspace_optimizer_with_postprocessor(backproj):
    """SubspaceDPOptimizer runs DPOptimizer.step for its full parameters: with an identity
    post-processor they take the release path, and the projected weight still moves (fused
    back-projection, or its torch step after super()); bit-identical to no post-processor."""
    from dpkern.subspace import SubspacePrivacyEngine, orthonormalize
    runs = []
    for post in (None, [_identity]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        u = orthonormalize(torch.randn(5, 2, generator=torch.Generator().manual_seed(1)))
        v = orthonormalize(torch.randn(6, 3, generator=torch.Generator().manual_seed(2)))
        before = model[0].weight.detach().clone()
        model, dp, _ = SubspacePrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.05),
            data_loader=None, noise_multiplier=SIGMA, max_grad_norm=C, expected_batch_size=B,
            sample_rate=0.1, seed=5, subspace={"0": (u, v)}, grad_postprocessors=post)
        dp.fused_backprojection = backproj
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            model(torch.randn(B, 6, generator=g)).square().sum(1).mean().backward()
            dp.step()
            assert dp.last_step_path == ("fused" if post is None else "release")
            assert dp.last_backproj == backproj
            dp.zero_grad()
        assert not torch.equal(model[0].weight, before)
        assert dp.noise_generator.step == 3
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_release_step_does_not_synchronise():
    """On the GPU the release path's step (release pass, a post-processor, noise-free update, the
    accountant) only launches work, as the fused step does (tests/engine/test_no_sync_gpu.py)."""
    import contextlib

    from dpkern.losses import per_sample_losses
    from tests.conftest import sync_is_an_error
    from tests.engine import _models

    def halve(grads, noise_std):
        for g in grads.values():
            g.mul_(0.5)

    torch.manual_seed(0)
    model = _models.build("llama").cuda()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, opt, _ = PrivacyEngine(accountant="rdp", backend="auto").make_private(
        module=model, optimizer=opt, data_loader=None, noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4, sample_rate=0.01, loss_reduction="sum", seed=0,
        grad_postprocessors=[halve])
    batch = {k: v.cuda() for k, v in _models.batch_for("llama", 4, seq=63, seed=1).items()}
    for step in range(3):  # the first steps fill caches (compiled kernels, descriptor tables)
        per_sample_losses(model, batch).sum().backward()
        with sync_is_an_error() if step == 2 else contextlib.nullcontext():
            opt.step()
        assert opt.last_step_path == "release"
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
