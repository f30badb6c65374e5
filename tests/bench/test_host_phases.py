"""bench/host_phases.py on the tiny model (on the GPU when there is one, else on the CPU with
the Triton interpreter): both modes in rounds, phases that add up, the clipper timed inside
dpkern's backward only, op counts, and the JSON written."""
import json

from bench import host_phases
from tests.conftest import HAS_GPU

DEVICE = "cuda" if HAS_GPU else "cpu"


def test_host_phases_tiny_cpu(tmp_path):
    out = tmp_path / "phases.json"
    rep = host_phases.main(["--tiny", "--device", DEVICE, "--cases", "2x8,1x5", "--precisions",
                            "fp32", "--rounds", "3", "--warmup", "1", "--out", str(out)])
    assert json.loads(out.read_text())["cases"] == json.loads(json.dumps(rep["cases"]))
    assert [(c["B"], c["T"]) for c in rep["cases"]] == [(2, 8), (1, 5)]
    for case in rep["cases"]:
        for mode in ("nonprivate", "dpkern"):
            rows = case["rows"][mode]
            assert len(rows) == 3
            for r in rows:
                host = r["forward"] + r["backward"] + r["step"] + r["tail"]
                if DEVICE == "cpu":   # wall time = the phases
                    assert abs(r["gpu"] - host) <= 0.05 * host + 0.5, r
                else:   # CUDA events inside the synchronised phases
                    assert 0 < r["gpu"] <= host + 0.5, r
                assert 0 <= r["clipper"] <= r["backward"], r
                assert (r["clipper"] > 0) == (mode == "dpkern"), r
            ops = case["ops"][mode]
            assert ops["forward"] > 0 and ops["backward"] > 0 and ops["step"] > 0, ops
        assert case["ratio_of_medians"] > 0 and case["paired_ratio_median"] > 0


def test_host_phases_plan_cache_ab(tmp_path, monkeypatch):
    """--plan-cache-ab: a third mode steps the dpkern model with the plan cache off (and only
    that mode: the cache is on again for the others)."""
    from dpkern.ops import _persample
    seen = []
    real = host_phases.one_step

    def spy(runner, clock, *args, **kw):
        seen.append(_persample.PlanCache.enabled)
        return real(runner, clock, *args, **kw)
    monkeypatch.setattr(host_phases, "one_step", spy)
    rep = host_phases.main(["--tiny", "--device", DEVICE, "--cases", "2x8", "--precisions",
                            "fp32", "--rounds", "2", "--warmup", "1", "--plan-cache-ab",
                            "--out", str(tmp_path / "p.json")])
    case = rep["cases"][0]
    assert len(case["rows"]["dpkern-noplan"]) == 2 and case["paired_ratio_median_noplan"] > 0
    assert all(r["clipper"] > 0 for r in case["rows"]["dpkern-noplan"])
    assert seen.count(False) == 2 and len(seen) == 6 and _persample.PlanCache.enabled
    # with the cache off in the environment (DPKERN_PLAN_CACHE=0) no mode turns it on, and it
    # stays off afterwards
    seen.clear()
    monkeypatch.setattr(_persample.PlanCache, "enabled", False)
    host_phases.main(["--tiny", "--device", DEVICE, "--cases", "2x8", "--precisions", "fp32",
                      "--rounds", "2", "--warmup", "1", "--out", str(tmp_path / "q.json")])
    assert seen == [False] * 4 and not _persample.PlanCache.enabled


def test_host_phases_clipper_parts(tmp_path):
    """--clipper-parts: the dpkern clipper split by stage, stages inside the clipper, Triton
    launches counted, and the wrapped functions restored afterwards."""
    import dpkern.engine as eng
    import triton.runtime.jit as jit
    before = (eng.norms_sq, eng.release_bound_matrix, eng._Clipper._bookkeep_rows, jit.JITFunction.run)
    rep = host_phases.main(["--tiny", "--device", DEVICE, "--cases", "2x8", "--precisions",
                            "fp32", "--rounds", "2", "--warmup", "1", "--clipper-parts",
                            "--out", str(tmp_path / "p.json")])
    case = rep["cases"][0]
    for r in case["rows"]["dpkern"]:
        parts = r["parts"]
        staged = sum(parts[k] for k in host_phases.ClipperParts.STAGES)
        assert all(parts[k] > 0 for k in ("norms", "bounds", "clip", "bookkeeping")), parts
        assert staged <= r["clipper"] + 1e-6 and parts["triton"] <= staged, (parts, r)
        assert parts["launches"] > 0
    assert all("parts" not in r for r in case["rows"]["nonprivate"])
    # a launch outside the stages (here: outside any clipper) is not counted
    parts = host_phases.ClipperParts()
    try:
        parts.on = True
        import torch
        from dpkern.ops.rownorm import rownorm_sq
        rownorm_sq(torch.ones(2, 3, device=DEVICE), backend="triton")
        assert parts.take()["launches"] == 0
    finally:
        parts.close()
    assert set(case["clipper_parts"]) >= {"norms", "triton", "launches", "other"}
    after = (eng.norms_sq, eng.release_bound_matrix, eng._Clipper._bookkeep_rows, jit.JITFunction.run)
    assert all(x is y for x, y in zip(before, after))


def test_input_addresses_counts_repeats(tmp_path):
    """--input-addresses: one signature per dpkern backward (none for the non-private mode), and
    InputAddresses.repeats() counts a backward whose inputs moved, changed layout or count."""
    rep = host_phases.main(["--tiny", "--device", DEVICE, "--cases", "2x8", "--precisions",
                            "fp32", "--rounds", "3", "--warmup", "1", "--input-addresses",
                            "--out", str(tmp_path / "p.json")])
    got = rep["cases"][0]["input_addresses"]
    assert got["backwards"] == 3 and got["tensors"] > 0
    assert 0 <= got["same_as_previous"] <= 2
    rec = host_phases.InputAddresses(lambda uses: None)
    rec.on = True
    import torch
    x = torch.zeros(4, 3)

    class Use:
        def __init__(self, t):
            self.a, self.path = t, "p"
    rec({"w": [Use(x)]})
    rec({"w": [Use(x)]})                # same tensor: a repeat
    rec({"w": [Use(x.t())]})            # same address, other strides: moved
    rec({"w": [Use(x[1:])]})            # another address
    rec({"w": [Use(x[1:]), Use(x)]})    # one tensor more
    assert rec.repeats() == {"backwards": 5, "same_as_previous": 1, "tensors": 2,
                             "moved_tensors_median": 1.0}


def test_cuda_api_by_phase(tmp_path):
    """--cuda-api: the three phases of both modes, each call counted once with a host time; on a
    CUDA device the launches are there, and dpkern's backward and step do not synchronise the
    device (tests/engine/test_no_sync_gpu.py's contract; the forward holds the model's own loss)."""
    rep = host_phases.main(["--tiny", "--device", DEVICE, "--cases", "2x8", "--precisions",
                            "fp32", "--rounds", "1", "--warmup", "1", "--cuda-api",
                            "--out", str(tmp_path / "p.json")])
    api = rep["cases"][0]["cuda_api"]
    assert set(api) == {"nonprivate", "dpkern"}
    for phases in api.values():
        assert set(phases) == {"forward", "backward", "step", "waits"}
        assert all(k.split()[1] in host_phases.WAITS for k in phases.pop("waits"))
        for calls in phases.values():
            assert set(calls) <= set(host_phases.CUDA_API)
            assert all(n > 0 and ms >= 0 for n, ms in calls.values())
    if DEVICE == "cuda":
        assert sum(n for n, _ in api["dpkern"]["backward"].values()) > 0
        for ph in ("backward", "step"):
            for sync in ("cudaStreamSynchronize", "cudaDeviceSynchronize"):
                assert sync not in api["dpkern"][ph], (ph, api["dpkern"][ph])


def test_step_waits_flags_the_call_that_waits(monkeypatch):
    """step_waits: a call that waits for the queued work (here a stand-in: _check_grads sleeps
    50 ms once the queue was called) is flagged, with the step around it; the calls that do not
    wait are not; the wrapped calls and step hooks are restored afterwards."""
    import threading
    import time
    import types

    from bench.e2e_step import Runner, case_inputs, llama_config
    from dpkern.optim.dp_optimizer import DPOptimizer
    cfg = llama_config(True)
    runner = Runner(cfg, DEVICE, "dpkern", types.SimpleNamespace(backend="triton", sigma=1.0,
                                                                 clip=1.0), expected_bsz=2)
    ids, pos, amp = case_inputs(cfg, 2, 8, "fp32", DEVICE)
    queued = threading.Event()
    real = DPOptimizer._check_grads

    def waiting(self):
        if queued.is_set():
            time.sleep(0.05)
            queued.clear()
        return real(self)
    monkeypatch.setattr(DPOptimizer, "_check_grads", waiting)
    hooks = list(runner.opt.step_hooks)
    try:
        got = host_phases.step_waits(runner, ids, pos, amp, queue=queued.set, queued_ms=50.0,
                                     repeats=2)
        assert len(hooks) == 1 and runner.opt.step_hooks == hooks  # the same hook objects
    finally:
        runner.close()
    calls = got["calls"]
    assert got["queued_ms"] == 50.0
    assert calls["_check_grads"]["waits"] and calls["step"]["waits"], calls
    assert calls["_check_grads"]["queued_ms"] >= 50.0 > calls["_check_grads"]["idle_ms"]
    assert not calls["zero_grad"]["waits"] and not calls["step_hook0"]["waits"], calls
    assert all(not v["waits"] for k, v in calls.items() if k not in ("_check_grads", "step"))
    assert DPOptimizer.__dict__["_check_grads"] is waiting


def test_step_waits_without_cuda_queues_nothing():
    """Off CUDA, with no queue given, there is nothing to wait for: no calls reported."""
    import types

    import torch
    x = types.SimpleNamespace(device=torch.device("cpu"))
    assert host_phases.step_waits(None, x, None, None) == {"queued_ms": 0.0, "calls": {}}


def test_pipelined_rounds(tmp_path, monkeypatch):
    """--pipelined K: per round, K steps of each mode back to back (counted), times per step,
    and a paired ratio."""
    from bench.e2e_step import Runner
    steps = []
    real = Runner.step

    def counted(self, *a, **kw):
        steps.append(self.mode)
        return real(self, *a, **kw)
    monkeypatch.setattr(Runner, "step", counted)
    rep = host_phases.main(["--tiny", "--device", DEVICE, "--cases", "2x8", "--precisions",
                            "fp32", "--rounds", "2", "--warmup", "1", "--pipelined", "3",
                            "--out", str(tmp_path / "p.json")])
    pl = rep["cases"][0]["pipelined"]
    assert pl["steps"] == 3 and set(pl["rows"]) == {"nonprivate", "dpkern"}
    for rows in pl["rows"].values():
        assert len(rows) == 2 and all(r["gpu"] > 0 and r["host"] > 0 for r in rows)
    assert pl["paired_ratio_median"] > 0
    # 1 warm-up step per mode, then 2 rounds x 3 pipelined steps per mode
    assert steps.count("dpkern") == steps.count("nonprivate") == 1 + 6
