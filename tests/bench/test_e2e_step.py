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


def test_paired_runs_interleave_the_two_modes(tmp_path, monkeypatch):
    """--paired: non-private and dpkern built together, their steps interleaved per case (the
    warm-up of each, then one step of each per round, the order alternating), dpkern's rows with
    a paired ratio; a mode outside the pair still runs after, on its own."""
    order = []
    real = e2e_step.Runner.step

    def step(self, *a, **kw):
        order.append(self.mode)
        return real(self, *a, **kw)
    monkeypatch.setattr(e2e_step.Runner, "step", step)
    monkeypatch.setattr(e2e_step, "plot", lambda rows, path: None)
    out = tmp_path / "e2e.json"
    rep = e2e_step.main(["--tiny", "--device", "cpu", "--paired", "--modes",
                         "dpkern,nonprivate,dpkern-rmt", "--cases", "2x8,1x5", "--precisions",
                         "fp32", "--steps", "3", "--warmup", "1", "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert rep["paired"] and [(r["B"], r["mode"]) for r in runs[:4]] == [
        (2, "nonprivate"), (2, "dpkern"), (1, "nonprivate"), (1, "dpkern")]
    assert all(r["status"] == "ok" and r.get("paired") for r in runs[:4])
    assert runs[4]["mode"] == "dpkern-rmt" and "paired" not in runs[4]
    np_, dp = "nonprivate", "dpkern"
    case = [np_, dp, np_, dp, dp, np_, np_, dp]  # warm-up, then rounds np dp / dp np / np dp
    assert order[:16] == case + case
    for r in runs[:4]:
        assert len(r["times_ms"]) == 3 and r["median_ms"] > 0
    for r in (runs[1], runs[3]):
        ratios = sorted(d / n for n, d in zip(runs[runs.index(r) - 1]["times_ms"], r["times_ms"]))
        assert r["paired_ratio"] == ratios[1]
    rows = {(r["B"], r["mode"]): r for r in rep["summary"]}
    assert rows[(2, "dpkern")]["paired_ratio"] == runs[1]["paired_ratio"]
    assert rows[(2, "nonprivate")]["paired_ratio"] is None


def test_resident_bytes_counts_parameters_and_state_once():
    """resident_bytes: parameters and optimizer state tensors, a shared storage once; host
    tensors only when asked (the device count of CPU tensors is 0)."""
    import types

    import torch
    w = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.float64))   # 256 bytes
    model = torch.nn.Module()
    model.w, model.v = w, torch.nn.Parameter(torch.zeros(3))         # 12 bytes
    shared = torch.zeros(10)                                          # 40 bytes, two views
    opt = types.SimpleNamespace(state={w: {"m": shared, "v": shared[2:], "step": 3}})
    runner = types.SimpleNamespace(model=model, opt=opt)
    assert e2e_step.resident_bytes(runner, host_too=True) == 256 + 12 + 40
    assert e2e_step.resident_bytes(runner) == 0
