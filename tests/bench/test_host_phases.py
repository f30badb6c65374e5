"""bench/host_phases.py on the tiny model on the CPU: both modes in rounds, phases that add up,
the clipper timed inside dpkern's backward only, op counts, and the JSON written."""
import json

from bench import host_phases


def test_host_phases_tiny_cpu(tmp_path):
    out = tmp_path / "phases.json"
    rep = host_phases.main(["--tiny", "--device", "cpu", "--cases", "2x8,1x5", "--precisions",
                            "fp32", "--rounds", "3", "--warmup", "1", "--out", str(out)])
    assert json.loads(out.read_text())["cases"] == json.loads(json.dumps(rep["cases"]))
    assert [(c["B"], c["T"]) for c in rep["cases"]] == [(2, 8), (1, 5)]
    for case in rep["cases"]:
        for mode in ("nonprivate", "dpkern"):
            rows = case["rows"][mode]
            assert len(rows) == 3
            for r in rows:
                host = r["forward"] + r["backward"] + r["step"] + r["tail"]
                assert abs(r["gpu"] - host) <= 0.05 * host + 0.5, r  # CPU: wall = the phases
                assert 0 <= r["clipper"] <= r["backward"], r
                assert (r["clipper"] > 0) == (mode == "dpkern"), r
            ops = case["ops"][mode]
            assert ops["forward"] > 0 and ops["backward"] > 0 and ops["step"] > 0, ops
        assert case["ratio_of_medians"] > 0 and case["paired_ratio_median"] > 0
