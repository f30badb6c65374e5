"""compare.py: ratio table rules and one real CPU quick run against HEAD in a git worktree."""
import subprocess
from pathlib import Path

import pytest

from bench import compare

ROOT = Path(__file__).resolve().parents[2]


def _rec(name, ms, status="passed", correct=True):
    return {"name": name, "median_ms": ms, "status": status, "correct": correct}


def test_ratio_rows_rules():
    base = [_rec("same", 2.0), _rec("faster_but_wrong", 2.0), _rec("fails_now", 2.0),
            _rec("gone", 1.0), _rec("skip", None, "skipped", None), _rec("baseline", 4.0, correct=None)]
    head = [_rec("same", 1.0), _rec("faster_but_wrong", 0.1, correct=False),
            _rec("fails_now", 0.1, "failed", False), _rec("new", 1.0),
            _rec("skip", None, "skipped", None), _rec("baseline", 2.0, correct=None)]
    rows = {r["name"]: r for r in compare.ratio_rows(base, head)}
    assert rows["same"]["ratio"] == pytest.approx(2.0)
    assert rows["baseline"]["ratio"] == pytest.approx(2.0)
    for name in ("faster_but_wrong", "fails_now"):
        assert rows[name]["ratio"] is None and rows[name]["note"].startswith("FAIL head")
    assert rows["gone"]["note"] == "only at base" and rows["new"]["note"] == "only at head"
    assert rows["skip"]["note"] == "skipped" and rows["skip"]["ratio"] is None
    text = compare.format_table(list(rows.values()), "HEAD", quick=True)
    assert "QUICK MODE" in text and "2.000" in text


def test_junit_outcomes(tmp_path):
    x = tmp_path / "j.xml"
    x.write_text('<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure/></testcase>'
                 '<testcase name="c"><skipped/></testcase><testcase name="d"><error/></testcase>'
                 '</testsuite></testsuites>')
    assert compare.junit_outcomes(x) == {"a": "passed", "b": "failed", "c": "skipped", "d": "failed"}


def _git_ok():
    r = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=ROOT, capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _git_ok(), reason="needs the git history (not on the GPU machine copy)")
def test_compare_quick_against_head(tmp_path, capsys):
    """Quick mode is the CPU path (Triton under the interpreter); on a GPU host the full mode is
    what runs (bench/gpu_all.sh), and the interpreter needs numpy < 2.4, which the GPU machine's
    environment may not have."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("quick mode is CPU-only: the GPU machine runs the full suite")
    rows = compare.main(["--base", "HEAD", "--quick", "--paths", "bench/bench_rownorm.py",
                         "--out", str(tmp_path)])
    names = {r["name"] for r in rows}
    assert names == {f"test_{op}[{shape}-torch.{dt}-{be}]"
                     for op, shape in [("rownorm_bench", "B8xN512"),
                                       ("row_norm_dots_bench", "B2xT16xd24xp20")]
                     for dt in ("float32", "bfloat16") for be in ("torch", "triton")}
    assert all(r["ratio"] and r["ratio"] > 0 and r["note"] == "" for r in rows), rows
    out = capsys.readouterr().out
    assert "base/head" in out and "QUICK MODE" in out
    assert (tmp_path / "compare.json").exists() and (tmp_path / "base" / "bench.json").exists()
    wt = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "dpkern_base_" not in wt                                 # the worktree is removed


def test_compare_bad_base_names_it():
    if not _git_ok():
        pytest.skip("needs the git history")
    with pytest.raises(SystemExit, match="--base: unknown revision 'no-such-rev'"):
        compare.main(["--base", "no-such-rev", "--quick"])
