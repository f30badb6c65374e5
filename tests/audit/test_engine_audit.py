"""The engine audited end to end: noise through make_private, Poisson batches, the one-run audit,
and mutations (each one injected by monkeypatching here, never by a switch in production code).

| mutation                     | caught by                                            |
|------------------------------|------------------------------------------------------|
| noise halved                 | test_engine_noise_statistics (std off by 50%)         |
| clipping disabled            | test_audit_catches_clipping_disabled (eps_lower > eps)|
| noise added per micro-batch  | test_microbatches_add_noise_once (std off by sqrt(k)) |
| noise reused across steps    | test_noise_fresh_across_steps (correlation)           |
| empty-batch noise dropped    | test_empty_batch_releases_noise (weights unchanged)   |
"""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpkern.audit import DiracCanaries, one_run_audit
from dpkern.audit.stats import correlation_report, gaussian_report, poisson_report
from dpkern.data.poisson import DPDataLoader, microbatches
from dpkern.engine import PrivacyEngine
from dpkern.optim.dp_optimizer import DPOptimizer

SIGMA, C, B = 1.1, 0.5, 16


def _zero_model_engine(n_in=1000, n_out=1000, seed=0, n_data=64):
    """Linear with zero weights on all-zero data: every per-sample gradient is 0, so one SGD step
    with lr = 1 moves the weights by exactly -(sigma C z) / B_expected."""
    model = torch.nn.Linear(n_in, n_out, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(torch.zeros(n_data, n_in)), batch_size=B)
    eng = PrivacyEngine()
    model, opt, loader = eng.make_private(module=model, optimizer=opt, data_loader=loader,
                                          noise_multiplier=SIGMA, max_grad_norm=C, seed=seed)
    return eng, model, opt, loader


def _one_step(model, opt, x):
    before = model.weight.detach().clone()
    if x.shape[0]:
        model(x).sum(dim=1).mean().backward()
    else:
        opt.signal_empty_batch()
    opt.step()
    opt.zero_grad()
    return model.weight.detach() - before


def _first_nonempty(loader):
    for (x,) in loader:
        if x.shape[0]:
            return x
    raise AssertionError("no non-empty batch")


# --- noise ---------------------------------------------------------------------------------------

def _halve_noise(monkeypatch):
    real = DPOptimizer.add_noise_
    monkeypatch.setattr(DPOptimizer, "add_noise_", lambda self, acc, std: real(self, acc, std / 2))


@pytest.mark.parametrize("mutation", [None, "noise_halved"])
def test_engine_noise_statistics(monkeypatch, mutation):
    if mutation:
        _halve_noise(monkeypatch)
    eng, model, opt, loader = _zero_model_engine()
    noise = -_one_step(model, opt, _first_nonempty(loader))
    rep = gaussian_report(noise, SIGMA * C / B)
    assert rep.ok == (mutation is None), rep.failures
    assert len(eng.accountant) == 1


@pytest.mark.parametrize("mutation", [None, "noise_per_microbatch"])
def test_microbatches_add_noise_once(monkeypatch, mutation):
    if mutation:
        real = DPOptimizer.note_backward

        def noisy_note(self, rows, nonfinite=0):
            real(self, rows, nonfinite)
            for p in self.params:
                self.add_noise_(self.accumulator(p), self.noise_multiplier * self.max_grad_norm)

        monkeypatch.setattr(DPOptimizer, "note_backward", noisy_note)
    eng, model, opt, loader = _zero_model_engine(seed=1)
    x = torch.zeros(B, 1000)
    before = model.weight.detach().clone()
    for mb in microbatches(x, 4):  # 4 micro-batches, one logical step
        model(mb).sum(dim=1).mean().backward()
    opt.step()
    rep = gaussian_report(before - model.weight.detach(), SIGMA * C / B)
    assert rep.ok == (mutation is None), rep.failures


@pytest.mark.parametrize("mutation", [None, "noise_reused"])
def test_noise_fresh_across_steps(monkeypatch, mutation):
    if mutation:
        from dpkern.noise import NoiseGenerator
        monkeypatch.setattr(NoiseGenerator, "next_step", lambda self: 0)  # counter never advances
    eng, model, opt, loader = _zero_model_engine(n_in=300, n_out=300, seed=2)
    x = _first_nonempty(loader)
    a, b = _one_step(model, opt, x), _one_step(model, opt, x)
    assert correlation_report(a, b).ok == (mutation is None)


@pytest.mark.parametrize("mutation", [None, "empty_batch_noise_dropped"])
def test_empty_batch_releases_noise(monkeypatch, mutation):
    if mutation:
        real = DPOptimizer.add_noise_
        monkeypatch.setattr(DPOptimizer, "add_noise_",
                            lambda self, acc, std: None if self.backwards == 0 else real(self, acc, std))
    model = torch.nn.Linear(200, 50, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(torch.zeros(100, 200)), batch_size=1)  # q = 0.01
    eng = PrivacyEngine()
    model, opt, loader = eng.make_private(module=model, optimizer=opt, data_loader=loader,
                                          noise_multiplier=SIGMA, max_grad_norm=C, seed=3)
    empties = steps = 0
    for (x,) in loader:
        before = model.weight.detach().clone()
        if x.shape[0]:
            model(x).sum(dim=1).mean().backward()
        opt.step()  # the loader reported an empty batch: no backward needed
        opt.zero_grad()
        steps += 1
        if x.shape[0] == 0:
            empties += 1
            moved = model.weight.detach() - before
            released = gaussian_report(moved, SIGMA * C / 1, min_draws=10_000).values.get("std_ratio")
            if mutation:
                assert torch.count_nonzero(moved) == 0
            else:
                assert released is not None and abs(released - 1) < 0.05
    assert empties > 20 and len(eng.accountant) == steps == len(loader)
    assert eng.get_epsilon(1e-5) > 0


# --- Poisson sampler -----------------------------------------------------------------------------

def test_poisson_sampler_statistics():
    n, q, steps = 500, 0.05, 400
    loader = DPDataLoader(TensorDataset(torch.arange(n)), sample_rate=q, steps=steps,
                          generator=torch.Generator().manual_seed(4))
    masks = torch.zeros(steps, n, dtype=torch.bool)
    for t, (idx,) in enumerate(loader):
        masks[t, idx] = True
    poisson_report(masks, q).assert_ok()
    assert not poisson_report(masks, 0.06).ok                        # wrong rate is caught
    shuffled = torch.zeros_like(masks)                               # fixed-size batches are not Poisson
    for t in range(steps):
        shuffled[t, torch.randperm(n, generator=torch.Generator().manual_seed(t))[:25]] = True
    assert not poisson_report(shuffled, q).ok


# --- the one-run audit ---------------------------------------------------------------------------

M, K_GUESS, DELTA, BASE = 1000, 100, 1e-5, 16
Q, STEPS, SIGMA_AUDIT = 0.5, 4, 2.385  # PRV eps(1e-5) ~ 2.0 (asserted below)


def _train_fn(seed):
    def train(dataset):
        n, dim = dataset.shape
        model = torch.nn.Linear(dim, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        expected = max(1, round(Q * (BASE + M / 2)))  # public: from the expected dataset size
        loader = DataLoader(TensorDataset(dataset), batch_size=expected)
        eng = PrivacyEngine(accountant="prv")
        model, opt, loader = eng.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA_AUDIT,
            max_grad_norm=1.0, sample_rate=Q, expected_batch_size=expected, seed=seed)
        loader.batch_sampler.steps = STEPS
        for (x,) in loader:
            if x.shape[0]:
                (-model(x).sum(dim=1)).mean().backward()  # per-sample loss -w.x: gradient -x
            opt.step()
            opt.zero_grad()
        return {"final": model.weight.detach(), "epsilon": eng.get_epsilon(DELTA)}
    return train


def _audit(seed):
    gen = torch.Generator().manual_seed(seed)
    canaries = DiracCanaries.create(M, BASE + M, scale=100.0, generator=gen)
    data = torch.zeros(200, BASE + M)
    data[:, :BASE] = torch.randn(200, BASE, generator=gen)
    return one_run_audit(_train_fn(seed), canaries, data=data, k_pos=K_GUESS, k_neg=K_GUESS,
                         delta=DELTA, generator=gen)


def test_audit_holds_for_the_engine():
    res = _audit(seed=10)
    assert 1.9 < res.eps_claimed < 2.05
    assert not res.violates_claim(), res.as_dict()
    assert res.eps_lower <= res.eps_claimed and res.eps_lower_fdp <= res.eps_claimed
    assert res.v > res.r // 2  # the canaries are visible: the audit is not blind


def test_audit_catches_clipping_disabled(monkeypatch):
    import dpkern.engine as engine_mod

    def no_clip(bounds, clipping, max_grad_norm, per_param=None, gamma=0.01):
        # bounds: the engine's (P, B) matrix (clip_factors also takes a list of (B,) rows)
        u = bounds if isinstance(bounds, torch.Tensor) else torch.stack(bounds)
        finite = torch.isfinite(u.sum(0))
        return [finite.float()] * len(bounds), finite

    monkeypatch.setattr(engine_mod, "clip_factors", no_clip)
    res = _audit(seed=11)
    assert res.violates_claim(), res.as_dict()
