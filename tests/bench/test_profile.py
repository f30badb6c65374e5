"""profile_step.py on the tiny preset (CPU): trace, breakdown rows, FLOP model, patches undone."""
import json

import pytest
import torch

from bench import profile_step as ps


def test_ranges_exclusive_times():
    r = ps.Ranges("cpu")
    r.spans = [(("step",), 0.0, 1.0), (("step", "backward"), 0.1, 0.7),
               (("step", "backward", "norms"), 0.2, 0.4), (("step", "forward"), 0.7, 0.8)]
    ex = r.exclusive_ms()
    assert ex[("step",)] == pytest.approx(300.0)
    assert ex[("step", "backward")] == pytest.approx(400.0)
    assert ex[("step", "backward", "norms")] == pytest.approx(200.0)
    assert sum(ex.values()) == pytest.approx(1000.0) and r.spans == []


def test_flop_model_linear_terms():
    from transformers import LlamaConfig
    cfg = LlamaConfig(**ps.PRESETS["tiny"], num_key_value_heads=4)
    f = ps.flop_model(cfg, bsz=2, seq=16, backend="torch")
    h, i, v, layers = 64, 160, 128, 2
    dp = layers * (4 * h * h + 3 * h * i) + h * v
    assert f["forward:Linear"] == f["bookkeeping:Linear"] == f["backward:Linear"] == 2 * 32 * dp
    assert f["norms:Linear"] > 0 and f["norms:Embedding"] == 2 * 16 * 16 * h


def test_profile_tiny_cpu(tmp_path):
    import dpkern.engine as eng
    from dpkern.layers.linear import _LinearFn
    before = (eng.norms_sq, _LinearFn.__dict__["backward"])
    rep = ps.main(["--out", str(tmp_path), "--preset", "tiny", "--device", "cpu", "--steps", "1"])
    assert (eng.norms_sq, _LinearFn.__dict__["backward"]) == before     # patches undone
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    for n in ("dp:step", "dp:forward", "dp:backward", "dp:norms", "dp:bookkeeping", "dp:noise+optimizer",
              "dp:norms:Linear", "dp:backward:Linear", "dp:forward:Linear"):
        assert n in names, n
    rows = rep["rows"]
    parts = {r["part"] for r in rows}
    assert set(ps.PARTS) <= parts | {"other"} and "total step" in parts
    body = [r for r in rows if r["part"] != "total step"]
    assert sum(r["ms"] for r in body) == pytest.approx(rows[-1]["ms"], rel=1e-6)
    assert sum(r["pct"] for r in body) == pytest.approx(100.0, rel=1e-6)
    lin = {(r["part"], r["layer_type"]): r for r in body}
    for key in (("forward", "Linear"), ("per-sample norms", "Linear"), ("book-keeping GEMMs", "Linear"),
                ("noise + optimizer", "(rest)")):
        assert lin[key]["ms"] > 0 and lin[key]["predicted_ms"] > 0, key
    saved = json.loads((tmp_path / "breakdown.json").read_text())
    assert saved["env"]["torch"] == torch.__version__ and saved["args"]["preset"] == "tiny"
    assert "FLOP model ms" in (tmp_path / "breakdown.txt").read_text()
    assert not (tmp_path / "memory_snapshot.pickle").exists()         # GPU only
