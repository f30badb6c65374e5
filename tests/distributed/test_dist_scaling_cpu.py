"""CPU smoke test of bench/dist_scaling.py (gloo, 2 ranks, tiny Llama): every stage runs, the
outputs are written, and the noise of the 2-rank summed update is the single-process noise."""
from __future__ import annotations

import importlib
import json

import pytest


@pytest.mark.slow
def test_dist_scaling_cpu_mode(tmp_path):
    pytest.importorskip("transformers")
    mod = importlib.import_module("bench.dist_scaling")  # importable: spawned ranks unpickle it
    rc = mod.main(["--cpu", "--out", str(tmp_path), "--steps", "1", "--warmup", "1",
                   "--stage-timeout", "120"])
    res = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0 and res["errors"] == {}, res["errors"]
    for mode in ("ddp", "fsdp"):
        chk = res["noise_check"][mode]
        assert chk["within_1pct"] and chk["max_abs_z_diff_sample"] <= 1e-5, chk
        assert abs(chk["var_single"] - 1) < 0.05  # z is standard normal (n ~ 27k coordinates)
    for w in (1, 2):
        for mode in ("nonprivate", "dp"):
            assert res["stages"][f"scaling/tiny/world{w}"][mode]["tokens_per_s"] > 0
    csv = (tmp_path / "scaling.csv").read_text().splitlines()
    assert csv[0].startswith("model,mode") and len(csv) == 3
    assert "efficiency" in (tmp_path / "summary.txt").read_text()
