"""Distributed checkpoints (torch.distributed.checkpoint) under FSDP2, gloo on CPU: a 2-rank run
saves after step 2 and goes on to step 3; fresh runs of 2 and of 3 ranks load that checkpoint and
run step 3. All equal the single-process run with the same global B, q and seed (within the fp32
tolerance of test_distributed.py), with the same ε, noise counter and global batches."""
from __future__ import annotations

import pytest
import torch

from dpkern.distributed import launch
from tests.distributed import _workers as W
from tests.distributed._compare import max_diff, tol as _tol


def tol(steps: int) -> float:
    return _tol(steps, torch.device("cpu"), 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dcp") / "step2")
    straight = launch.spawn(W.dcp_train, 2, args=(path, 2), timeout_s=180)
    same = launch.spawn(W.dcp_train, 2, args=(path, None, True), timeout_s=180)
    other = launch.spawn(W.dcp_train, 3, args=(path, None, True), timeout_s=180)
    refused = launch.spawn(W.dcp_refusal, 2, args=(path,), timeout_s=180)
    single = W.train("single", torch.device("cpu"), sigma=1.0, steps=3, world=2)
    return straight, same, other, refused, single


@pytest.mark.parametrize("which", ["same_world", "other_world"])
def test_resume_equals_straight_run(runs, which):
    straight, same, other, _, single = runs
    resumed = same if which == "same_world" else other
    for r in straight:
        assert max_diff(r["params"], single["params"]) <= tol(3)
    for r in resumed:
        assert r["first"] == 2  # the counter came back: it resumes after the saved step
        assert r["counter"] == r["noise_steps"] == single["counter"] == 3
        assert r["eps"] == single["eps"] == straight[0]["eps"]
        assert sum((x["rows"][0] for x in resumed), []) == single["rows"][2]  # the sampler
        assert max_diff(r["params"], single["params"]) <= tol(3)
        assert max_diff(r["params"], straight[0]["params"]) <= tol(3)


def test_resume_is_not_a_fresh_start(runs):
    """Control: without the checkpoint, step 3 alone from the initial weights is far off."""
    _, same, _, _, single = runs
    init, _ = W.build("plain", torch.device("cpu"))
    assert max_diff(W.full_params(init), single["params"]) > 1e3 * tol(3)
    assert same[0]["eps"] > 0


def test_other_configuration_refused(runs):
    *_, refused, _ = runs
    for msg in refused:
        assert msg is not None and "noise_multiplier" in msg
        assert msg.endswith("counter 0 | params unchanged True")
