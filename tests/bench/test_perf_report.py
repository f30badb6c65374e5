"""perf_report.py on the committed H100 run: files, GPU named, failed cases never as numbers."""
from pathlib import Path

from bench import perf_report as pr

RUN2 = Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_run2_h100"


def test_report_from_gpu_run(tmp_path, capsys):
    section = pr.main(["--run", str(RUN2), "--out", str(tmp_path)])
    for f in ("perf.md", "perf.png", "readme_section.md"):
        assert (tmp_path / f).stat().st_size > 0
    assert "NVIDIA H100 80GB HBM3" in section and section.startswith("## Performance")
    assert "| bookkeeping_wgrad | 8x512x2048x2048 | bf16 | triton |" in section
    md = (tmp_path / "perf.md").read_text()
    table, failed = md.split("## Failed cases")
    assert "test_noise_step_bench[adamw-bf16-triton]" in failed
    assert "adamw-bf16-triton" not in table                        # failed: not in the numbers
    assert "noise_step_bench[adamw-bf16-cuda]" in table
    assert capsys.readouterr().out.strip() == section.strip()


def test_fastest_wrong_backend_is_not_reported():
    base = {"op": "rownorm_sq", "shape": [4, 8], "dtype": "torch.float32", "status": "passed"}
    recs = [dict(base, name="t[a-cuda]", backend="cuda", median_ms=0.01, correct=False),
            dict(base, name="t[a-triton]", backend="triton", median_ms=0.5, correct=True, gbps=1.0),
            dict(base, name="t[a-torch]", backend="torch", median_ms=1.0, correct=True)]
    (row,) = pr.kernel_rows(recs)
    assert row["backend"] == "triton" and row["vs_torch"] == 2.0 and row["failed"] == "cuda"
    recs[1]["status"] = "failed"
    (row,) = pr.kernel_rows(recs)
    assert row["ms"] is None and "not reported" in pr.kernel_table([row])


def test_e2e_csv_table(tmp_path):
    p = tmp_path / "e2e_step.csv"
    p.write_text("B,T,precision,mode,status,median_ms,peak_mem_gib,floor,floor_triangle,time_ratio,"
                 "mem_ratio\n8,512,bf16,dpkern,ok,120.5,30.1,1.2,1.1,1.31,1.05\n"
                 "8,512,bf16,opacus-hooks,failed: OOM,,,1.2,1.1,,\n")
    t = pr.e2e_table(p)
    assert "| 8 | 512 | bf16 | dpkern | 120.5 | 1.31 | 1.05 | 1.20 | ok |" in t
    assert "failed: OOM" in t


def test_e2e_csv_found_in_the_run_subfolder(tmp_path):
    """gpu_all.sh writes the e2e sweep to <run>/e2e/e2e_step.csv: the report must find it there."""
    run = tmp_path / "run"
    run.mkdir()
    for f in ("bench.json", "env.txt", "bench.log"):
        (run / f).write_bytes((RUN2 / f).read_bytes())
    (run / "e2e").mkdir()
    (run / "e2e" / "e2e_step.csv").write_text(
        "B,T,precision,mode,status,median_ms,peak_mem_gib,floor,floor_triangle,time_ratio,"
        "mem_ratio\n8,512,bf16,dpkern,ok,120.5,30.1,1.2,1.1,1.31,1.05\n")
    section = pr.main(["--run", str(run), "--out", str(tmp_path / "out")])
    assert "End-to-end DP step" in section and "| 8 | 512 | bf16 | dpkern | 120.5 |" in section


def test_run_without_bench_json_still_reports_e2e(tmp_path):
    """A harness stopped by its time limit leaves no bench.json: the e2e table is still reported,
    and the missing microbenchmarks are said, not shown as an empty table of numbers."""
    run = tmp_path / "run"
    (run / "e2e").mkdir(parents=True)
    (run / "env.txt").write_bytes((RUN2 / "env.txt").read_bytes())
    (run / "e2e" / "e2e_step.csv").write_text(
        "B,T,precision,mode,status,median_ms,peak_mem_gib,floor,floor_triangle,time_ratio,"
        "mem_ratio\n8,512,bf16,dpkern,ok,120.5,30.1,1.2,1.1,1.31,1.05\n")
    section = pr.main(["--run", str(run), "--out", str(tmp_path / "out")])
    assert "| 8 | 512 | bf16 | dpkern | 120.5 |" in section
    assert "No microbenchmark results in this run." in section
    assert "bench.json missing" in (tmp_path / "out" / "perf.md").read_text()
