"""DP training on torch.distributed vs the single-process engine (tests/distributed/_workers.py).

One spawn of 2 ranks per backend runs every scenario (gloo on CPU in CI; nccl, one GPU per rank, on
a machine with >= 2 GPUs). The single-process runs use dpkern.PrivacyEngine with the global batch
size and the same seed: same Poisson batches, same noise key.

Tolerance (fp32 sum order): a step's clipped sum adds at most N_DATA*T terms of norm <= C, so the
distributed and single-process sums differ by at most 2*N_DATA*T*eps32*C (fp32 recursive
summation, first order); the update divides by B_expected and is scaled by lr; with momentum beta
an error feeds into every later step (<= 1/(1-beta)); plus one fp32 rounding of |theta| per step.
On CUDA, cuBLAS may pick a different GEMM for a different batch size, which changes each
per-sample gradient by a few ulps more: x8. The controls check that the quantities compared move
by far more than this tolerance (a test that cannot fail is no test).
"""
from __future__ import annotations

import os

import pytest
import torch

from dpkern.distributed import (DistributedPoissonSampler, NO_MULTICAST_ENV, launch, shard_rows,
                                split_counts)
from dpkern.data.poisson import PoissonSampler
from tests.distributed import _workers as W
from tests.distributed._compare import backends, max_diff
from tests.distributed._compare import single as _single, tol as _tol

# Ranks per run (2 in CI; DPKERN_TEST_WORLD=4 on a machine with 4 GPUs, the code is generic).
WORLD = int(os.environ.get("DPKERN_TEST_WORLD", "2"))
BACKENDS = backends(WORLD)


def tol(steps: int, device: torch.device) -> float:
    return _tol(steps, device, WORLD)


@pytest.fixture(scope="module", params=BACKENDS)
def run(request):
    """(results by rank, device of the single-process runs)."""
    backend = request.param
    old = os.environ.get("NCCL_NVLS_ENABLE")
    os.environ["NCCL_NVLS_ENABLE"] = "1"  # the launcher must switch it off in the ranks anyway
    try:
        dev = "cuda" if backend == "nccl" else "cpu"
        res = launch.spawn(W.run_suite, WORLD, backend=backend, args=(dev,), timeout_s=240)
    finally:
        if old is None:
            os.environ.pop("NCCL_NVLS_ENABLE", None)
        else:
            os.environ["NCCL_NVLS_ENABLE"] = old
    return res, torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")


def single(kind: str, device, **kw) -> dict:
    return _single(kind, device, WORLD, **kw)


def test_nvlink_multicast_off_in_started_processes(run):
    res, _ = run
    for r in res:
        assert r["env"] == NO_MULTICAST_ENV


@pytest.mark.parametrize("mode", W.MODES)
@pytest.mark.parametrize("sigma", [0.0, 1.0], ids=["noise_off", "noise_on"])
def test_equals_single_process(run, mode, sigma):
    res, dev = run
    ref = single("train", dev, sigma=sigma, steps=3)
    t = tol(3, dev)
    for rank, r in enumerate(res):
        got = r[("train", mode, sigma)]
        assert max_diff(got["params"], ref["params"]) <= t, (mode, rank)
        assert got["counter"] == ref["counter"] == 3 and got["noise_steps"] == 3
        assert got["eps"] == ref["eps"]
        if mode != "fsdp":
            assert got["in_sync"], f"{mode}: replicas differ on rank {rank}"
    if sigma > 0:  # control: the noise moves the parameters far beyond the tolerance
        off = single("train", dev, sigma=0.0, steps=3)
        assert max_diff(off["params"], ref["params"]) > 1e3 * t


def test_poisson_split_is_the_single_process_batch(run):
    res, dev = run
    ref = single("train", dev, sigma=0.0, steps=3)
    for mode in W.MODES:
        parts = [r[("train", mode, 0.0)] for r in res]
        for k, want in enumerate(ref["rows"]):
            got = [p["rows"][k] for p in parts]
            assert sum(got, []) == want, (mode, k)  # disjoint, in rank order, nothing lost
            sizes = [len(g) for g in got]
            assert sizes == split_counts(len(want), WORLD) == parts[0]["local_sizes"][k]
    assert any(len(r) != W.PER_RANK * WORLD for r in ref["rows"])  # batches really vary


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_poisson_sampler_split_in_process(world):
    def draws(r):
        return list(DistributedPoissonSampler(30, 0.07, rank=r, world_size=world, steps=40,
                                              generator=torch.Generator().manual_seed(3)))
    per_rank = [draws(r) for r in range(world)]
    single_draws = list(PoissonSampler(30, 0.07, steps=40,
                                       generator=torch.Generator().manual_seed(3)))
    assert any(len(b) == 0 for b in single_draws)  # empty global batches occur at this q
    for k, want in enumerate(single_draws):
        got = [p[k] for p in per_rank]
        assert sum(got, []) == want
        assert max(map(len, got)) - min(map(len, got)) <= 1


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_empty_share_on_one_rank(run, mode):
    res, dev = run
    ref = single("one", dev, sigma=1.0, rows_by_rank=[3] + [0] * (WORLD - 1))
    for r in res:
        assert max_diff(r[("empty_rank", mode)]["params"], ref["params"]) <= tol(1, dev)
        assert r[("empty_rank", mode)]["counter"] == 1


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_empty_global_batch_still_noised_once(run, mode):
    res, dev = run
    ref = single("one", dev, sigma=1.0, rows_by_rank=[0] * WORLD)
    init, _ = W.build("plain", dev)
    moved = max_diff(W.full_params(init), ref["params"])
    assert moved > 1e3 * tol(1, dev)  # the noise-only step moves the parameters
    for r in res:
        got = r[("all_empty", mode)]
        assert max_diff(got["params"], ref["params"]) <= tol(1, dev)
        assert got["counter"] == 1 and got["eps"] == ref["eps"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_checkpoint_resume_same_epsilon_counter_and_params(run, mode):
    res, dev = run
    for r in res:
        resumed, straight = r[("resume", mode)], r[("train", mode, 1.0)]
        assert resumed["counter"] == straight["counter"] == 3
        assert resumed["noise_steps"] == 3
        assert resumed["eps"] == straight["eps"]
        assert resumed["rows"] == straight["rows"]  # the sampler resumes, too
        assert max_diff(resumed["params"], straight["params"]) <= tol(3, dev)


def test_secure_key_is_shared(run):
    """No seed: rank 0's os.urandom key and sampling seed reach every rank."""
    res, _ = run
    a = res[0][("secure", "ddp")]
    for r in res[1:]:
        b = r[("secure", "ddp")]
        assert a["in_sync"] and b["in_sync"]
        assert max_diff(a["params"], b["params"]) == 0.0
        assert a["eps"] == b["eps"] and a["rows"] != b["rows"]  # own shares of one global batch


def test_refusals_on_every_rank(run):
    res, _ = run
    for r in res:
        msg = r["refusals"]["step_without_backward"]
        assert msg is not None and "every rank must call step()" in msg
        msg = r["refusals"]["fsdp_postprocessors"]
        assert msg is not None and "grad_postprocessors" in msg
        msg = r["refusals"]["fsdp_shard1"]
        assert msg is not None and "Shard(dim=1)" in msg and "HSDP" in msg


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_gradient_accumulation_equals_one_batch(run, mode):
    """Rank 0 runs its 4 rows as micro-batches 2 + 2, the others their 3 rows as 2 + 1: the same
    as one process with all the rows in one batch (each sample clipped once, noise once)."""
    res, dev = run
    ref = single("one", dev, sigma=1.0, rows_by_rank=[4] + [3] * (WORLD - 1))
    for r in res:
        assert max_diff(r[("micro", mode)]["params"], ref["params"]) <= tol(1, dev)
        assert r[("micro", mode)]["counter"] == 1


def test_fsdp_sums_are_reduced_as_they_are_written(run):
    """Each parameter's full-size clipped sum is reduce-scattered right after the engine writes it:
    when the engine hands over a sum, it is the only full-size one alive (kept until step(), the
    k-th would find k), nothing full-size is left after a backward, and the shard sums have the
    shards' shapes. Both micro-batches of a step go through it (gradient accumulation)."""
    res, _ = run
    for r in res:
        tr = r[("micro", "fsdp")]["trace"]
        names = list(tr["after_backward"][0]["want"])
        assert tr["order"] == names * 2  # model order, once per parameter and backward
        assert tr["alive"] == [1] * len(tr["order"])
        assert max(tr["alive_numel"]) == tr["largest"]
        for st in tr["after_backward"]:
            assert st["full_left"] == 0 and st["local"] == st["want"]
        first, second = (st["sum_abs"] for st in tr["after_backward"])
        assert all(second[n] != first[n] for n in names)  # the second micro-batch accumulated


def test_fsdp_reductions_in_flight_give_the_same_result(run):
    """inflight_bytes unbounded: the reductions of a whole backward overlap (several full-size sums
    in flight), all complete by the end of the backward, and the step is the same."""
    res, dev = run
    ref = single("one", dev, sigma=1.0, rows_by_rank=[4] + [3] * (WORLD - 1))
    for r in res:
        got = r[("micro_overlap", "fsdp")]
        assert max(got["trace"]["alive"]) > 1
        assert all(st["full_left"] == 0 for st in got["trace"]["after_backward"])
        assert max_diff(got["params"], ref["params"]) <= tol(1, dev)


def test_fsdp_reduce_at_step_keeps_the_sums_and_gives_the_same_result(run):
    """reduce_at_step: the engine's grouped path writes the full-size sums, they stay after each
    backward (nothing is handed over), and step() reduces them once: the same step."""
    res, dev = run
    ref = single("one", dev, sigma=1.0, rows_by_rank=[4] + [3] * (WORLD - 1))
    for r in res:
        got = r[("micro_at_step", "fsdp")]
        assert got["trace"]["order"] == []
        assert all(st["full_left"] == len(st["want"]) and st["local"] == {}
                   for st in got["trace"]["after_backward"])
        assert max_diff(got["params"], ref["params"]) <= tol(1, dev)


def test_calibration_uses_the_global_sampling_rate(run):
    res, _ = run
    want = W.calibrated_sigma_single(WORLD)
    assert want != W.calibrated_sigma_single(1)  # control: the batch size matters
    for r in res:
        assert r["refusals"]["calibrated_sigma"] == pytest.approx(want, rel=1e-12)


def test_world_of_one_without_process_group_is_the_single_engine():
    """No process group: DistributedPrivacyEngine is PrivacyEngine, bit for bit."""
    cpu = torch.device("cpu")
    got = W.train("plain", cpu, sigma=1.0, steps=2, world=1)
    want = W.train("single", cpu, sigma=1.0, steps=2, world=1)
    assert max_diff(got["params"], want["params"]) == 0.0
    assert got["rows"] == want["rows"] and got["eps"] == want["eps"]


def test_bad_input_is_refused_with_the_argument_named():
    from dpkern.distributed import DistributedDPOptimizer, DistributedPrivacyEngine
    from dpkern.distributed.optimizer import set_noise_key
    from dpkern.noise import NoiseGenerator
    model, opt = W.build("plain", torch.device("cpu"))
    loader = torch.utils.data.DataLoader(W.dataset(), batch_size=4)
    with pytest.raises(ValueError, match="poisson_sampling"):
        DistributedPrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                noise_multiplier=1.0, max_grad_norm=1.0,
                                                poisson_sampling=False)
    with pytest.raises(ValueError, match="seed"):
        DistributedPrivacyEngine(secure_mode=True).make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, seed=1)
    with pytest.raises(ValueError, match="expected_batch_size"):
        DistributedPrivacyEngine().make_private(module=model, optimizer=opt, data_loader=None,
                                                noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="DPOptimizer"):
        DistributedDPOptimizer.adopt(opt)
    with pytest.raises(ValueError, match="16 bytes"):
        set_noise_key(NoiseGenerator(), b"short")
    with pytest.raises(ValueError, match="nprocs"):
        launch.spawn(W.hang_or_fail, 0)
    with pytest.raises(ValueError, match="backend"):
        launch.spawn(W.hang_or_fail, 1, backend="mpi")
    with pytest.raises(ValueError, match="rank"):
        DistributedPoissonSampler(10, 0.5, rank=2, world_size=2)
    eng = DistributedPrivacyEngine(accountant="rdp")
    with pytest.raises(ValueError, match="2 ranks"):
        eng.load_state_dict({"world_size": 2, "accountant": eng.accountant.state_dict()})


def test_shard_rows_is_torch_chunk():
    for n in (0, 1, 5, 7, 8, 63):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(n).chunk(world) if n else []
            for r in range(world):
                a, b = shard_rows(n, world, r)
                want = chunks[r].tolist() if r < len(chunks) else []
                assert list(range(a, b)) == want, (n, world, r)


def test_split_counts():
    assert split_counts(7, 3) == [3, 2, 2] and split_counts(0, 2) == [0, 0]
    assert split_counts(1, 4) == [1, 0, 0, 0]


def test_launcher_reports_failing_rank():
    with pytest.raises(RuntimeError, match="rank one fails on purpose"):
        launch.spawn(W.hang_or_fail, 2, args=("fail",), timeout_s=60)


def test_launcher_times_out_on_hang():
    with pytest.raises(RuntimeError, match="timed out"):
        launch.spawn(W.hang_or_fail, 2, args=("hang",), timeout_s=6)
