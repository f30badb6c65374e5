"""`dpkern finetune --method ...`: lmo-dp (certified by default, the paper's ε only on opt-in and
labelled), rmt-denoise (post-processing, same ε), dp-sft (two stages charged to one ε).

The ε checks recompute the number independently from the mechanism written to privacy.json, so a
job that reported the wrong accounting (or the Gaussian one) would fail them.
"""
from __future__ import annotations

import json

import pytest
import torch

import dpkern.mechanisms.lmo as lmo_mod
from dpkern.cli import main
from dpkern.mechanisms import LMOMechanism, LMOParams

FAST = ["--steps", "3", "--batch-size", "32", "--physical-batch-size", "16", "--trainable", "all",
        "--no-progress"]


def cli(capsys, tmp_path, tiny_model, tiny_data, *args):
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(tiny_model), "--data", str(tiny_data), *FAST,
                 "--output-dir", str(out), *args])
    std = capsys.readouterr()
    return code, std.out, std.err, out


@pytest.fixture
def lmo_calls(monkeypatch):
    """Counts LMO-DP noise additions (the mechanism really runs, not the Gaussian)."""
    calls = {"n": 0}
    real = lmo_mod.LMOMechanism.add_noise_

    def spy(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(lmo_mod.LMOMechanism, "add_noise_", spy)
    return calls


def test_lmo_default_is_certified(capsys, tmp_path, tiny_model, tiny_data, lmo_calls):
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, "--method", "lmo-dp")
    assert code == 0, err
    assert "certified upper bound" in out and "NOT CERTIFIED" not in out
    p = json.loads((run / "privacy.json").read_text())
    assert p["method"] == "lmo-dp" and p["epsilon_certified"] is True
    assert p["noise_steps"] == 3 and p["noise_multiplier"] is None
    assert 2.8 < p["epsilon"] <= 3.0, "calibrated to the target, never over it"
    assert lmo_calls["n"] >= 3, "LMO-DP noise must be added at every step"
    mech = LMOMechanism(LMOParams(**p["mechanism"]["params"]), 1.0, accounting="certified")
    again = mech.certified_epsilon(sample_rate=32 / 400, steps=3, delta=1e-5).epsilon
    assert p["epsilon"] == pytest.approx(again, rel=1e-12)
    assert p["noise_std_per_coordinate"] == pytest.approx(mech.noise_std(), rel=1e-9)
    s = json.loads((run / "summary.json").read_text())
    assert s["epsilon_certified"] is True and s["epsilon"] == p["epsilon"]


def test_lmo_reported_epsilon_needs_opt_in_and_is_labelled(capsys, tmp_path, tiny_model,
                                                           tiny_data, lmo_calls):
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, "--method", "lmo-dp",
                              "--accept-uncertified-epsilon")
    assert code == 0, err
    assert "as reported by LMO-DP, not certified" in out and "NOT CERTIFIED" in out
    assert "WARNING" in out
    p = json.loads((run / "privacy.json").read_text())
    assert p["epsilon_certified"] is False and "not certified" in p["epsilon_label"]
    assert 2.8 < p["epsilon"] <= 3.0 and "NOT a certified" in p["warning"]
    params = LMOParams(**p["mechanism"]["params"])
    rep = LMOMechanism(params, 1.0, accounting="reported", accept_uncertified_epsilon=True)
    assert p["epsilon"] == pytest.approx(
        rep.reported_epsilon(sample_rate=32 / 400, steps=3, delta=1e-5).epsilon, rel=1e-12)
    cert = LMOMechanism(params, 1.0, accounting="certified").certified_epsilon(
        sample_rate=32 / 400, steps=3, delta=1e-5).epsilon
    assert p["certified_epsilon_same_noise"] == pytest.approx(cert, rel=1e-12)
    assert cert > p["epsilon"], "the paper's number understates the certified one"
    assert lmo_calls["n"] >= 3


def test_accept_uncertified_only_with_lmo(capsys, tmp_path, tiny_model, tiny_data):
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data,
                              "--accept-uncertified-epsilon")
    assert code == 2 and "--accept-uncertified-epsilon" in err and "lmo-dp" in err
    assert not (run / "metrics.jsonl").exists()


def test_lmo_refuses_noise_multiplier(capsys, tmp_path, tiny_model, tiny_data):
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, "--method", "lmo-dp",
                              "--noise-multiplier", "1.0")
    assert code == 2 and "--noise-multiplier" in err and "lmo-dp" in err
    assert not (run / "metrics.jsonl").exists()


def test_lmo_impossible_budget(capsys, tmp_path, tiny_model, tiny_data):
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, "--method", "lmo-dp",
                              "--epsilon", "0.001", "--batch-size", "200", "--steps", "400")
    assert code == 2 and "impossible budget" in err and "--epsilon" in err, err
    assert not (run / "metrics.jsonl").exists()


def test_lmo_params_preset_fixed_noise_paper_accounting(capsys, tmp_path, tiny_model, tiny_data,
                                                         lmo_calls):
    """--lmo-params paper-default runs the paper's configuration unscaled (no calibration: ε is
    reported, not targeted); with --lmo-mgf-domain artifact its ε is the paper's own, labelled, with
    the one-step 0.293 in privacy.json, and the certified ε of the same noise beside it."""
    from dpkern.mechanisms import PAPER_DEFAULT
    from dpkern.mechanisms import lmo_accountant as A
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, "--method", "lmo-dp",
                              "--lmo-params", "paper-default", "--accept-uncertified-epsilon",
                              "--lmo-mgf-domain", "artifact", "--delta", "1e-10")
    assert code == 0, err
    assert "LMO-DP noise given" in out and "NOT CERTIFIED" in out and "artifact" in out
    p = json.loads((run / "privacy.json").read_text())
    assert LMOParams(**p["mechanism"]["params"]) == PAPER_DEFAULT, "no calibration, no scaling"
    assert p["target_epsilon"] is None and p["epsilon_certified"] is False
    m = p["mechanism"]
    assert m["lmo_params"] == "paper-default" and m["mgf_domain"] == "artifact"
    assert m["eps_lmo"] == pytest.approx(0.2932, abs=1e-4)
    assert m["sigma_eq"] == pytest.approx(23.256, abs=1e-3)
    rep = A.reported_epsilon(PAPER_DEFAULT, sample_rate=32 / 400, steps=3, delta=1e-10,
                             mgf_domain="artifact")
    assert p["epsilon"] == pytest.approx(rep.epsilon, rel=1e-12)
    strict = A.reported_epsilon(PAPER_DEFAULT, sample_rate=32 / 400, steps=3, delta=1e-10)
    assert p["epsilon"] != pytest.approx(strict.epsilon, rel=1e-6), "the domain must be passed on"
    cert = A.certified_epsilon(PAPER_DEFAULT, sample_rate=32 / 400, steps=3, delta=1e-10)
    assert p["certified_epsilon_same_noise"] == pytest.approx(cert.epsilon, rel=1e-12)
    assert cert.epsilon > p["epsilon"]
    assert lmo_calls["n"] >= 3
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epsilon"] is None and cfg["lmo_params"] == "paper-default"


def test_lmo_params_json_certified(capsys, tmp_path, tiny_model, tiny_data, lmo_calls):
    """A .json of LMOParams fields, certified accounting by default (no opt-in needed)."""
    params = LMOParams(a1=0.3, a3=0.2, a4=0.5, theta=0.5, k=2.0, lam=5.0, a=1.0, b=2.0)
    path = tmp_path / "lmo.json"
    path.write_text(json.dumps(params.as_dict()))
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, "--method", "lmo-dp",
                              "--lmo-params", str(path))
    assert code == 0, err
    p = json.loads((run / "privacy.json").read_text())
    assert LMOParams(**p["mechanism"]["params"]) == params and p["epsilon_certified"] is True
    assert p["mechanism"]["scale_of_paper_default"] is None
    cert = LMOMechanism(params, 1.0, accounting="certified").certified_epsilon(
        sample_rate=32 / 400, steps=3, delta=1e-5).epsilon
    assert p["epsilon"] == pytest.approx(cert, rel=1e-12)


def test_lmo_params_without_guarantee_refused(capsys, tmp_path, tiny_model, tiny_data):
    """a1·θ = 1.8: the MGF is undefined at every order, so no ε (reported or certified) exists."""
    path = tmp_path / "lmo.json"
    path.write_text(json.dumps({"a1": 0.9, "theta": 2.0}))
    for extra in ([], ["--accept-uncertified-epsilon"]):
        code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, "--method", "lmo-dp",
                                  "--lmo-params", str(path), *extra)
        assert code == 2 and "--lmo-params" in err and "not finite" in err, err
        assert not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("args,option,words", [
    (["--lmo-params", "paper-default"], "--lmo-params", "lmo-dp"),           # dp-sgd run
    (["--method", "lmo-dp", "--lmo-params", "no-such-preset"], "--lmo-params", "preset"),
    (["--method", "lmo-dp", "--lmo-mgf-domain", "artifact"], "--lmo-mgf-domain",
     "--accept-uncertified-epsilon"),                                          # certified ε
], ids=["not-lmo", "unknown-preset", "domain-without-opt-in"])
def test_lmo_params_errors(capsys, tmp_path, tiny_model, tiny_data, args, option, words):
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, *args)
    assert code == 2 and option in err and words in err, err
    assert not (run / "metrics.jsonl").exists()


def test_load_params_json_errors(tmp_path):
    from dpkern.mechanisms import PAPER_DEFAULT, load_params
    assert load_params("paper-default") is PAPER_DEFAULT
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a1": 0.1, "lambda": 5.0}))
    with pytest.raises(ValueError, match="unknown LMOParams field.*lambda"):
        load_params(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_params(str(bad))
    bad.write_text(json.dumps({"a1": 0.0, "a3": 0.0, "a4": 0.0}))
    with pytest.raises(ValueError, match="u = 0"):
        load_params(str(bad))


def test_rmt_denoise_same_epsilon_as_dp_sgd(capsys, tmp_path, tiny_model, tiny_data, monkeypatch):
    """rmt-denoise is post-processing: same σ and ε as dp-sgd, and the denoiser really runs."""
    import dpkern.denoise as denoise
    calls = {"n": 0}
    real = denoise.RMTDenoiser.__call__

    def spy(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(denoise.RMTDenoiser, "__call__", spy)
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, "--method", "rmt-denoise")
    assert code == 0, err
    p = json.loads((run / "privacy.json").read_text())
    code2, _, err2, run2 = cli(capsys, tmp_path / "b", tiny_model, tiny_data)
    assert code2 == 0, err2
    q = json.loads((run2 / "privacy.json").read_text())
    assert p["noise_multiplier"] == q["noise_multiplier"] and p["epsilon"] == q["epsilon"]
    assert p["epsilon_certified"] is True and calls["n"] == 3


def test_dp_sft_without_subspace_engine_is_clear(capsys, tmp_path, tiny_model, tiny_data,
                                                 monkeypatch):
    import dpkern.subspace
    monkeypatch.delattr(dpkern.subspace, "SubspacePrivacyEngine")
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, "--method", "dp-sft")
    assert code == 2 and "--method dp-sft" in err and "not available" in err, err
    assert not (run / "metrics.jsonl").exists()


def test_dp_sft_two_stages_one_epsilon(capsys, tmp_path, tiny_model, tiny_data, monkeypatch):
    """Stage 1 is charged (ε = a fresh accountant over ALL steps, not only stage 2's), the bases
    are set once from the stage-1 trajectory, and every stage-2 step releases the r × r noisy
    coordinates of each projected weight."""
    import dpkern.subspace.engine as sub
    from dpkern.accounting import create_accountant
    calls = {"bases": [], "released": 0}
    real_set, real_rel = sub.SubspaceDPOptimizer.set_bases, sub.SubspaceDPOptimizer._released_coords

    def spy_set(self, bases):
        calls["bases"].append({tuple(u.shape) + tuple(v.shape) for u, v in bases.values()})
        return real_set(self, bases)

    def spy_rel(self, step):
        calls["released"] += 1
        out = real_rel(self, step)
        assert all(s.shape == (4, 4) for s in out.values())
        return out

    monkeypatch.setattr(sub.SubspaceDPOptimizer, "set_bases", spy_set)
    monkeypatch.setattr(sub.SubspaceDPOptimizer, "_released_coords", spy_rel)
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, "--method", "dp-sft",
                              "--sft-rank", "4", "--steps", "4", "--sft-stage1-steps", "1")
    assert code == 0, err
    assert "dp-sft: steps 1-1 plain DP-SGD (stage 1, charged)" in out
    p = json.loads((run / "privacy.json").read_text())
    assert p["method"] == "dp-sft" and p["noise_steps"] == 4 and p["epsilon_certified"]
    assert p["dp_sft"]["stage1_steps"] == 1 and p["dp_sft"]["rank"] == 4
    assert "bert.pooler.dense.weight" in p["dp_sft"]["projected_layers"]
    assert len(calls["bases"]) == 1 and calls["bases"][0] == {(16, 4, 16, 4), (32, 4, 16, 4),
                                                             (16, 4, 32, 4)}
    assert calls["released"] == 3
    acc = create_accountant("prv")
    acc.step(noise_multiplier=p["noise_multiplier"], sample_rate=32 / 400, num_steps=4)
    assert p["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert 2.9 < p["epsilon"] <= 3.0


@pytest.mark.parametrize("args,needle", [
    (["--sft-rank", "64"], "--sft-rank 64"),            # no weight has both sides > 64
    (["--sft-stage1-steps", "3"], "--sft-stage1-steps"),  # leaves no stage 2 of the 3 steps
    (["--sft-rank", "0"], "--sft-rank"),
], ids=["rank_too_large", "no_stage2", "rank_zero"])
def test_dp_sft_bad_options(capsys, tmp_path, tiny_model, tiny_data, args, needle):
    code, out, err, run = cli(capsys, tmp_path, tiny_model, tiny_data, "--method", "dp-sft", *args)
    assert code == 2 and needle in err, err
    assert not (run / "metrics.jsonl").exists()


def test_dpsft_sketch_checkpoint_lands_on_the_weights_device():
    """The stage-1 trajectory sketch is saved with CPU tensors and restored onto the device of the
    tracked weights (a GPU run resumed from a checkpoint read onto the CPU once mixed devices in
    Y_U += M Ω). "meta" stands in for the GPU here; the GPU run is tests/cli/test_finetune_run.py."""
    from dpkern.finetune.sft import _load_sketch, _sketch_state
    from dpkern.subspace.bases import LowRankSketch
    s = LowRankSketch((6, 5), 2, seed=3)
    s.add(torch.randn(6, 5))
    st = _sketch_state(s)
    assert st["y_u"].device.type == "cpu" and st["y_v"].device.type == "cpu"
    moved = LowRankSketch((6, 5), 2, seed=3)
    _load_sketch(moved, st, torch.device("meta"))
    assert moved.y_u.device.type == "meta" and moved.y_v.device.type == "meta"
    back = LowRankSketch((6, 5), 2, seed=3)
    _load_sketch(back, _sketch_state(s), torch.device("cpu"))
    m = torch.randn(6, 5)
    s.add(m)
    back.add(m)  # the restored generator draws the same test matrices
    for x, y in zip(s.bases(), back.bases()):
        assert torch.equal(x, y)
