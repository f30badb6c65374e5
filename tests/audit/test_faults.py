"""Faults: a run killed mid-epoch and resumed from a checkpoint spends exactly the epsilon of an
uninterrupted run and never replays noise; bad checkpoints are refused with a clear error.

Two ways to checkpoint: piecewise (model, DPOptimizer with its noise counter, accountant and the
Poisson sampler's generator state saved separately), and engine.save_checkpoint / load_checkpoint
(one atomic file with a digest and the DP configuration, checked before anything is loaded).
"""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpkern.accounting import PRVAccountant, RDPAccountant
from dpkern.engine import PrivacyEngine

N, D, BSZ, SIGMA, C = 64, 8, 8, 1.0, 1.0


def _setup(seed):
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(99)
    data = TensorDataset(torch.randn(N, D, generator=g))
    eng = PrivacyEngine(accountant="rdp")
    model, opt, loader = eng.make_private(module=model, optimizer=opt,
                                          data_loader=DataLoader(data, batch_size=BSZ),
                                          noise_multiplier=SIGMA, max_grad_norm=C, seed=seed)
    return eng, model, opt, loader


def _run(model, opt, loader, n_steps, noises):
    it = iter(loader)
    for _ in range(n_steps):
        (x,) = next(it)
        before = [p.detach().clone() for p in model.parameters()]
        if x.shape[0]:
            model(x).pow(2).sum(dim=1).mean().backward()
        opt.step()
        opt.zero_grad()
        noises.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))


def _checkpoint(eng, model, opt, loader):
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(), "accountant": eng.accountant.state_dict(),
            "sampler": loader.batch_sampler.generator.get_state()}


def _resume(ckpt, seed):
    eng, model, opt, loader = _setup(seed)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    eng.accountant.load_state_dict(ckpt["accountant"])
    loader.batch_sampler.generator.set_state(ckpt["sampler"])
    return eng, model, opt, loader


def test_resume_spends_exactly_the_same_epsilon():
    eng, model, opt, loader = _setup(seed=5)
    full = []
    _run(model, opt, loader, 8, full)
    eps_full = eng.get_epsilon(1e-5)

    eng, model, opt, loader = _setup(seed=5)
    part = []
    _run(model, opt, loader, 3, part)  # ... killed here, after a checkpoint
    ckpt = _checkpoint(eng, model, opt, loader)
    eng2, model2, opt2, loader2 = _resume(ckpt, seed=5)
    _run(model2, opt2, loader2, 5, part)
    assert len(eng2.accountant) == 8 == len(eng.accountant) + 5
    assert eng2.get_epsilon(1e-5) == eps_full  # the same history, the same number, exactly
    assert opt2.noise_steps == 8


def test_resume_never_replays_noise():
    eng, model, opt, loader = _setup(seed=7)
    before = []
    _run(model, opt, loader, 3, before)
    ckpt = _checkpoint(eng, model, opt, loader)
    eng2, model2, opt2, loader2 = _resume(ckpt, seed=7)
    after = []
    # zero data so the update is the noise alone
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()
    x = torch.zeros(BSZ, D)
    model2(x).sum().backward()
    w0 = [p.detach().clone() for p in model2.parameters()]
    opt2.step()
    after = torch.cat([(p.detach() - b).flatten() for p, b in zip(model2.parameters(), w0)])
    eng3, model3, opt3, _ = _setup(seed=7)
    with torch.no_grad():
        for p in model3.parameters():
            p.zero_()
    model3(x).sum().backward()
    w0 = [p.detach().clone() for p in model3.parameters()]
    opt3.step()
    first = torch.cat([(p.detach() - b).flatten() for p, b in zip(model3.parameters(), w0)])
    assert not torch.allclose(after, first), "resumed run released step 0's noise again"


def test_corrupt_or_mismatched_accountant_state_refused():
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
    st = acc.state_dict()
    with pytest.raises(ValueError, match="accountant"):
        PRVAccountant().load_state_dict(st)
    bad = dict(st, history=[[float("nan"), 0.01, 10]])
    with pytest.raises(ValueError, match="noise_multiplier"):
        RDPAccountant().load_state_dict(bad)
    bad = dict(st, history=[[1.0, 1.5, 10]])
    with pytest.raises(ValueError, match="sample_rate"):
        RDPAccountant().load_state_dict(bad)
    bad = dict(st, history=[[1.0, 0.01, -3]])
    with pytest.raises(ValueError, match="num_steps"):
        RDPAccountant().load_state_dict(bad)


def test_noise_generator_refuses_mismatched_state():
    from dpkern.noise import NoiseGenerator
    det = NoiseGenerator(secure=False, seed=1)
    with pytest.raises(ValueError, match="secure"):
        det.load_state_dict(NoiseGenerator().state_dict())
    with pytest.raises(KeyError, match="step"):
        det.load_state_dict({"secure": False, "fingerprint": "x"})
    with pytest.raises(ValueError, match="bad step"):
        det.load_state_dict({"step": -1, "secure": False, "fingerprint": "x", "key": b"0" * 16})


def test_mismatched_optimizer_checkpoint_refused():
    eng, model, opt, loader = _setup(seed=1)
    _run(model, opt, loader, 1, [])
    st = opt.state_dict()
    torch.manual_seed(0)
    m2 = torch.nn.Linear(D, 2)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    m2, o2, _ = PrivacyEngine().make_private(module=m2, optimizer=o2,
                                             data_loader=DataLoader(loader.dataset, batch_size=BSZ),
                                             noise_multiplier=SIGMA / 2, max_grad_norm=C, seed=1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        o2.load_state_dict(st)


# --- engine.save_checkpoint / load_checkpoint: one atomic, checked file ---------------------------

def _adamw_setup(seed, *, sigma=SIGMA, clip=C, secure=False, accountant="rdp", clipping="flat"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(99)
    data = TensorDataset(torch.randn(N, D, generator=g))
    eng = PrivacyEngine(accountant=accountant, secure_mode=secure)
    model, opt, loader = eng.make_private(module=model, optimizer=opt,
                                          data_loader=DataLoader(data, batch_size=BSZ),
                                          noise_multiplier=sigma, max_grad_norm=clip,
                                          clipping=clipping, seed=None if secure else seed)
    return eng, model, opt, loader


def _epoch_steps(model, opt, loader, n_steps, it=None):
    it = iter(loader) if it is None else it
    for _ in range(n_steps):
        (x,) = next(it)
        if x.shape[0]:
            model(x).pow(2).sum(dim=1).mean().backward()
        opt.step()
        opt.zero_grad()
    return it


def _state(eng, model, opt):
    return ([p.detach().clone() for p in model.parameters()], opt.noise_generator.step,
            opt.noise_steps, list(eng.accountant.history),
            {k: v.clone() for k, v in opt.original_optimizer.state_dict()["state"][0].items()})


def _same_state(a, b):
    pa, sa, na, ha, oa = a
    pb, sb, nb, hb, ob = b
    return (sa, na, ha) == (sb, nb, hb) and all(torch.equal(x, y) for x, y in zip(pa, pb)) \
        and all(torch.equal(oa[k], ob[k]) for k in oa)


def test_engine_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    """Killed after step 3 of 8 and resumed in a fresh engine from save_checkpoint's file: the same
    batches, weights, AdamW state, noise counter and accountant history (bit for bit on CPU), so
    the same epsilon."""
    eng, model, opt, loader = _adamw_setup(seed=3)
    batches = []
    it = iter(loader)
    for _ in range(8):
        batches.append(next(it)[0])
        _epoch_steps(model, opt, [batches[-1:]], 1, it=iter([batches[-1:]]))
    full, eps_full = _state(eng, model, opt), eng.get_epsilon(1e-5)

    eng, model, opt, loader = _adamw_setup(seed=3)
    _epoch_steps(model, opt, loader, 3)
    eng.save_checkpoint(path=tmp_path / "ck.pt", module=model, optimizer=opt,
                        checkpoint_dict={"epoch": 0, "batches_done": 3})
    del eng, model, opt, loader  # the process dies
    eng2, model2, opt2, loader2 = _adamw_setup(seed=3)
    extra = eng2.load_checkpoint(path=tmp_path / "ck.pt", module=model2, optimizer=opt2)
    assert extra == {"epoch": 0, "batches_done": 3}
    assert opt2.noise_generator.step == 3 == opt2.noise_steps and len(eng2.accountant) == 3
    it2 = iter(loader2)  # the sampler's generator continues where step 3 left it
    for want in batches[3:]:
        got = next(it2)[0]
        assert torch.equal(got, want)
        _epoch_steps(model2, opt2, None, 1, it=iter([[got]]))
    assert _same_state(_state(eng2, model2, opt2), full)
    assert eng2.get_epsilon(1e-5) == eps_full and opt2.noise_steps == 8


def test_engine_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    eng, model, opt, loader = _adamw_setup(seed=4)
    _epoch_steps(model, opt, loader, 2)
    path = tmp_path / "ck.pt"
    eng.save_checkpoint(path=path, module=model, optimizer=opt)
    good = path.read_bytes()
    _epoch_steps(model, opt, loader, 1)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        real_save(obj, f, *a, **k)
        f.seek(0)
        f.truncate(100)
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        eng.save_checkpoint(path=path, module=model, optimizer=opt)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good                      # the previous checkpoint stands
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind
    eng2, model2, opt2, _ = _adamw_setup(seed=4)
    eng2.load_checkpoint(path=path, module=model2, optimizer=opt2)
    assert opt2.noise_steps == 2


def _damage(path, how, model):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # one bit of a weight's stored bytes: torch.load reads it without complaint
        w = model[0].weight.detach().contiguous().view(torch.uint8).numpy().tobytes()
        pos = bytes(data).find(w)
        assert pos > 0
        data[pos + 5] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_engine_checkpoint_damaged_file_refused_and_nothing_changes(tmp_path, how):
    eng, model, opt, loader = _adamw_setup(seed=5)
    _epoch_steps(model, opt, loader, 2)
    path = tmp_path / "ck.pt"
    eng.save_checkpoint(path=path, module=model, optimizer=opt)
    _damage(path, how, model)
    if how == "flip":
        torch.load(path, weights_only=True)  # the damage is invisible to torch itself
    eng2, model2, opt2, loader2 = _adamw_setup(seed=5)
    _epoch_steps(model2, opt2, loader2, 1)
    before = _state(eng2, model2, opt2)
    with pytest.raises(ValueError, match="damaged or not" if how == "truncate" else "digest"):
        eng2.load_checkpoint(path=path, module=model2, optimizer=opt2)
    assert _same_state(_state(eng2, model2, opt2), before)


@pytest.mark.parametrize("change, field", [
    (dict(sigma=SIGMA * 1.01), "noise_multiplier"), (dict(clip=C * 2), "max_grad_norm"),
    (dict(accountant="prv"), "accountant"), (dict(clipping="automatic"), "clipping")])
def test_engine_checkpoint_of_another_configuration_refused(tmp_path, change, field):
    eng, model, opt, loader = _adamw_setup(seed=6)
    _epoch_steps(model, opt, loader, 2)
    path = tmp_path / "ck.pt"
    eng.save_checkpoint(path=path, module=model, optimizer=opt)
    eng2, model2, opt2, loader2 = _adamw_setup(seed=6, **change)
    _epoch_steps(model2, opt2, loader2, 1)
    before = _state(eng2, model2, opt2)
    with pytest.raises(ValueError, match=field):
        eng2.load_checkpoint(path=path, module=model2, optimizer=opt2)
    assert _same_state(_state(eng2, model2, opt2), before)


def test_engine_checkpoint_refusals(tmp_path):
    eng, model, opt, loader = _adamw_setup(seed=7)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        eng.load_checkpoint(path=tmp_path / "none.pt", module=model, optimizer=opt)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="damaged or not a dpkern checkpoint"):
        eng.load_checkpoint(path=tmp_path / "junk.pt", module=model, optimizer=opt)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dpkern engine checkpoint"):
        eng.load_checkpoint(path=tmp_path / "other.pt", module=model, optimizer=opt)
    # half a step: clipped sums of a backward without its step() are not checkpointed
    (x,) = next(iter(loader))
    model(x).pow(2).sum(dim=1).mean().backward()
    with pytest.raises(RuntimeError, match="between steps"):
        eng.save_checkpoint(path=tmp_path / "ck.pt", module=model, optimizer=opt)
    opt.step()
    opt.zero_grad()
    eng.save_checkpoint(path=tmp_path / "ck.pt", module=model, optimizer=opt)
    # another model (same DP configuration, other parameters)
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(D, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    eng3 = PrivacyEngine(accountant="rdp")
    other, o3, _ = eng3.make_private(module=other, optimizer=torch.optim.AdamW(other.parameters()),
                                     data_loader=DataLoader(loader.dataset, batch_size=BSZ),
                                     noise_multiplier=SIGMA, max_grad_norm=C, seed=7)
    with pytest.raises(ValueError, match="other private parameters"):
        eng3.load_checkpoint(path=tmp_path / "ck.pt", module=other, optimizer=o3)
    with pytest.raises(ValueError, match="not the DPOptimizer"):
        eng.load_checkpoint(path=tmp_path / "ck.pt", module=model, optimizer=o3)
    with pytest.raises(RuntimeError, match="make_private first"):
        PrivacyEngine().save_checkpoint(path=tmp_path / "x.pt", module=model)


def test_engine_checkpoint_replay_refused(tmp_path):
    """Loading an older checkpoint into the live run that already released later steps under the
    same key would replay noise: refused, nothing changes."""
    eng, model, opt, loader = _adamw_setup(seed=8)
    _epoch_steps(model, opt, loader, 1)
    eng.save_checkpoint(path=tmp_path / "ck.pt", module=model, optimizer=opt)
    _epoch_steps(model, opt, loader, 2)
    before = _state(eng, model, opt)
    with pytest.raises(ValueError, match="replay"):
        eng.load_checkpoint(path=tmp_path / "ck.pt", module=model, optimizer=opt)
    assert _same_state(_state(eng, model, opt), before)


def test_secure_engine_checkpoint_holds_no_key(tmp_path):
    eng, model, opt, loader = _adamw_setup(seed=None, secure=True)
    _epoch_steps(model, opt, loader, 3)
    path = tmp_path / "ck.pt"
    eng.save_checkpoint(path=path, module=model, optimizer=opt)
    blob = torch.load(path, weights_only=True)
    assert "key" not in blob["payload"]["optimizer"]["dpkern"]["noise"]
    # the sampler's state is its draw counter (3 batches drawn), not its key
    assert blob["payload"]["engine"]["sampling_rng"].tolist() == [3, 0, 0, 0, 0, 0, 0, 0]
    eng2, model2, opt2, loader2 = _adamw_setup(seed=None, secure=True)
    eng2.load_checkpoint(path=path, module=model2, optimizer=opt2)
    _epoch_steps(model2, opt2, loader2, 2)
    _epoch_steps(model, opt, loader, 2)
    assert opt2.noise_generator.step == opt.noise_generator.step == 5
    assert eng2.get_epsilon(1e-5) == eng.get_epsilon(1e-5)


def test_checkpoint_refused_for_engines_with_more_state(tmp_path):
    from dpkern.subspace.engine import SubspacePrivacyEngine
    eng = SubspacePrivacyEngine()
    with pytest.raises(NotImplementedError, match="SubspacePrivacyEngine"):
        eng.save_checkpoint(path=tmp_path / "x.pt", module=torch.nn.Linear(2, 2))


def test_engine_checkpoint_resumes_postprocessor_state(tmp_path):
    """RMT denoising's warm start is state: the checkpoint carries it, so the resumed run's steps
    equal the uninterrupted run's (seeded, bit for bit on CPU); a fresh denoiser would start cold."""
    from dpkern.denoise import RMTDenoiser

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(99)
        data = TensorDataset(torch.randn(N, 24, generator=g))
        eng = PrivacyEngine(accountant="rdp")
        den = RMTDenoiser()
        model, opt, loader = eng.make_private(module=model, optimizer=opt,
                                              data_loader=DataLoader(data, batch_size=BSZ),
                                              noise_multiplier=SIGMA, max_grad_norm=C, seed=11,
                                              grad_postprocessors=[den])
        return eng, model, opt, loader, den

    eng, model, opt, loader, den = setup()
    it = iter(loader)
    _epoch_steps(model, opt, None, 5, it=it)
    full = [p.detach().clone() for p in model.parameters()]

    eng, model, opt, loader, den = setup()
    it = iter(loader)
    _epoch_steps(model, opt, None, 3, it=it)
    eng.save_checkpoint(path=tmp_path / "ck.pt", module=model, optimizer=opt)
    assert den.state_dict()["calls"] == 3 and den.state_dict()["matrices"]
    eng2, model2, opt2, loader2, den2 = setup()
    eng2.load_checkpoint(path=tmp_path / "ck.pt", module=model2, optimizer=opt2)
    assert den2.state_dict()["calls"] == 3
    for k, e in den.state_dict()["matrices"].items():
        assert torch.equal(den2.state_dict()["matrices"][k]["v"], e["v"])
    _epoch_steps(model2, opt2, None, 2, it=iter(loader2))
    assert all(torch.equal(a, b) for a, b in zip(full, model2.parameters()))
