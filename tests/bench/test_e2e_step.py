"""bench/e2e_step.py's loop: a case that fails half-way rebuilds the mode's model (a step that
died inside Opacus' hooks leaves per-sample state that fails every later case)."""
import json

from bench import e2e_step


def test_failed_case_rebuilds_the_runner(tmp_path, monkeypatch):
    built, closed = [], []

    class FakeRunner:
        n_params = 1

        def __init__(self, cfg, device, mode, args, expected_bsz):
            built.append(self)
            self.broken = False
            self.opt = None

        def close(self):
            closed.append(self)

    def fake_case(runner, cfg, device, precision, bsz, seq, args):
        if runner.broken:       # what a half-failed Opacus step leaves behind
            raise ValueError("Per sample gradient is not initialized")
        if bsz == 2:            # the first case runs out of memory half-way
            runner.broken = True
            raise MemoryError("out of memory")
        return {"median_ms": 1.0, "status": "ok", "n_params": 1}

    monkeypatch.setattr(e2e_step, "Runner", FakeRunner)
    monkeypatch.setattr(e2e_step, "run_case", fake_case)
    monkeypatch.setattr(e2e_step, "plot", lambda rows, path: None)
    out = tmp_path / "e2e.json"
    e2e_step.main(["--tiny", "--device", "cpu", "--modes", "opacus-hooks", "--cases", "2x8,4x8",
                   "--opacus-cases", "2x8,4x8", "--precisions", "fp32-tf32", "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [r["status"] for r in runs] == ["failed: MemoryError: out of memory", "ok"]
    assert len(built) == 2 and built[0] in closed


def test_rmt_mode_denoises_every_step(tmp_path, monkeypatch):
    """--modes dpkern-rmt (the issue-8 overhead): the DP model with an RMT denoiser that really
    runs on each timed step, and a row in the table beside dpkern's."""
    from dpkern.denoise import RMTDenoiser
    calls = []
    orig = RMTDenoiser.__call__

    def counting(self, grads, std):
        calls.append(len(grads))
        return orig(self, grads, std)
    monkeypatch.setattr(RMTDenoiser, "__call__", counting)
    monkeypatch.setattr(e2e_step, "plot", lambda rows, path: None)
    out = tmp_path / "e2e.json"
    e2e_step.main(["--tiny", "--device", "cpu", "--modes", "nonprivate,dpkern,dpkern-rmt",
                   "--cases", "2x8", "--precisions", "fp32", "--steps", "2", "--warmup", "1",
                   "--out", str(out)])
    runs = {r["mode"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["dpkern-rmt"]["status"] == "ok" and runs["dpkern"]["status"] == "ok"
    assert len(calls) == 3 and calls[0] > 0  # warm-up + 2 timed steps, on the released grads
    assert "mean_ms" in runs["dpkern-rmt"]
