"""HSDP (fully_shard on a 2-D replicate x shard mesh) vs the single-process engine: 4 ranks as
2 replicas x 2 shards (gloo on CPU; nccl with 4 GPUs). Same scenarios and tolerance policy as
test_distributed.py, at world size 4."""
from __future__ import annotations

import pytest
import torch

from dpkern.distributed import launch
from tests.distributed import _workers as W
from tests.distributed._compare import backends, max_diff
from tests.distributed._compare import single as _single, tol as _tol

WORLD = 4
BACKENDS = backends(WORLD)


def tol(steps: int, device: torch.device) -> float:
    return _tol(steps, device, WORLD)


@pytest.fixture(scope="module", params=BACKENDS)
def run(request):
    backend = request.param
    dev = "cuda" if backend == "nccl" else "cpu"
    res = launch.spawn(W.run_hsdp_suite, WORLD, backend=backend, args=(dev,), timeout_s=300)
    return res, torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")


def single(kind: str, device, **kw) -> dict:
    return _single(kind, device, WORLD, **kw)


@pytest.mark.parametrize("sigma", [0.0, 1.0], ids=["noise_off", "noise_on"])
def test_hsdp_equals_single_process(run, sigma):
    """Noise on: the replicas of a shard add the same z after the sum over all 4 ranks, so the
    update holds one σC·z (two replicas each adding their own, or noise before the replicate
    all-reduce, would move it by ~1000x the tolerance: the control)."""
    res, dev = run
    ref = single("train", dev, sigma=sigma, steps=3)
    t = tol(3, dev)
    for rank, r in enumerate(res):
        got = r[("train", "hsdp", sigma)]
        assert max_diff(got["params"], ref["params"]) <= t, rank
        assert got["counter"] == ref["counter"] == 3 and got["noise_steps"] == 3
        assert got["eps"] == ref["eps"]
        assert max_diff(got["params"], res[0][("train", "hsdp", sigma)]["params"]) == 0.0
    if sigma > 0:
        off = single("train", dev, sigma=0.0, steps=3)
        assert max_diff(off["params"], ref["params"]) > 1e3 * t


def test_hsdp_poisson_split_is_the_single_process_batch(run):
    res, dev = run
    ref = single("train", dev, sigma=0.0, steps=3)
    for k, want in enumerate(ref["rows"]):
        assert sum((r[("train", "hsdp", 0.0)]["rows"][k] for r in res), []) == want


def test_hsdp_gradient_accumulation_and_reductions_as_written(run):
    res, dev = run
    ref = single("one", dev, sigma=1.0, rows_by_rank=[4] + [3] * (WORLD - 1))
    for r in res:
        got = r[("micro", "hsdp")]
        assert max_diff(got["params"], ref["params"]) <= tol(1, dev)
        tr = got["trace"]
        assert tr["alive"] == [1] * len(tr["order"]) and len(tr["order"]) > 0
        for st in tr["after_backward"]:
            assert st["full_left"] == 0 and st["local"] == st["want"]


def test_hsdp_empty_share_on_three_ranks(run):
    res, dev = run
    ref = single("one", dev, sigma=1.0, rows_by_rank=[3] + [0] * (WORLD - 1))
    for r in res:
        assert max_diff(r[("empty_rank", "hsdp")]["params"], ref["params"]) <= tol(1, dev)
        assert r[("empty_rank", "hsdp")]["counter"] == 1
