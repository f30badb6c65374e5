"""make_private(mechanism=...): Gaussian (the default path, same noise and ε), LMO-DP (its own
noise and ε with its label; the uncertified reported ε needs its explicit opt-in), bad input."""
import pytest
import torch
from torch import nn

from dpkern import PrivacyEngine
from dpkern.mechanisms import (PAPER_DEFAULT, GaussianMechanism, LMOMechanism,
                               UncertifiedEpsilonError)


def _run(mechanism=None, sigma=1.0, c=0.5):
    torch.manual_seed(0)
    model = nn.Linear(8, 5)
    eng = PrivacyEngine(accountant="rdp")
    model, opt, _ = eng.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                     data_loader=None, noise_multiplier=sigma, max_grad_norm=c,
                                     expected_batch_size=4, sample_rate=0.1, seed=3,
                                     mechanism=mechanism)
    before = model.weight.detach().clone()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return eng, opt, model.weight.detach() - before


def test_gaussian_mechanism_is_the_default_path():
    eng_a, opt_a, da = _run()
    eng_b, opt_b, db = _run(GaussianMechanism(1.0, 0.5), sigma=None)
    assert opt_b.fused_available() and opt_b.mechanism is None
    torch.testing.assert_close(da, db)
    assert eng_a.get_epsilon(1e-5) == eng_b.get_epsilon(1e-5)
    assert eng_b.get_epsilon_report(1e-5).certified


def test_lmo_needs_its_opt_in_and_reports_its_label():
    with pytest.raises(UncertifiedEpsilonError):
        LMOMechanism(PAPER_DEFAULT, clip_norm=0.5)
    mech = LMOMechanism(PAPER_DEFAULT, clip_norm=0.5, accept_uncertified_epsilon=True)
    eng, opt, moved = _run(mech, sigma=None)
    assert opt.fused_available()  # LMO-DP noise is drawn in the fused noise + update kernel
    _, _, clean = _run(None, sigma=0.0)
    assert not torch.allclose(moved, clean)  # LMO noise was added
    rep = eng.get_epsilon_report(1e-5)
    assert not rep.certified and "not certified" in rep.label
    assert len(eng.accountant) == 0  # the Gaussian accountant is not used for LMO


def test_lmo_certified_accounting():
    eng, _, _ = _run(LMOMechanism(PAPER_DEFAULT, clip_norm=0.5, accounting="certified"), sigma=None)
    rep = eng.get_epsilon_report(1e-5)
    assert rep.certified and rep.epsilon > 0 and eng.get_epsilon(1e-5) == rep.epsilon


def test_mechanism_bad_input():
    with pytest.raises(ValueError, match="clip_norm"):
        _run(GaussianMechanism(1.0, 0.7), sigma=None, c=0.5)
    with pytest.raises(ValueError, match="noise_multiplier"):
        _run(GaussianMechanism(1.0, 0.5), sigma=2.0)
    with pytest.raises(TypeError, match="mechanism"):
        _run("gaussian")
