"""What the distributed test modules share: the backends to run, the fp32 tolerance of a
distributed run against the single-process one, the distance between parameter dicts, and the
single-process reference runs (cached: several tests compare with the same one)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import _workers as W

EPS32 = torch.finfo(torch.float32).eps


def backends(world: int) -> list:
    """gloo (CPU, always) and nccl (one GPU per rank, skipped with fewer GPUs)."""
    return ["gloo", pytest.param("nccl", marks=[
        pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < world,
                                            reason=f"needs {world} GPUs")])]


def tol(steps: int, device: torch.device, world: int) -> float:
    """Per-parameter distance allowed after `steps` steps: the fp32 reordering of the clipped sum
    over ranks (2·N·T·eps·C / B per step), carried by SGD with momentum, plus the update's own
    rounding; GPUs (TF32-rounded book-keeping inputs) get 8x."""
    sum_err = 2 * W.N_DATA * W.T * EPS32 * W.C / (W.PER_RANK * world)
    t = steps * (W.LR * sum_err / (1 - W.MOMENTUM) + 4 * EPS32)
    return t * (8 if device.type == "cuda" else 1)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


_SINGLE: dict = {}


def single(kind: str, device, world: int, **kw) -> dict:
    """The single-process run ("train" or another kind: one_step) a world of `world` ranks is
    compared with, computed once per arguments."""
    key = (kind, str(device), world, tuple(sorted((k, str(v)) for k, v in kw.items())))
    if key not in _SINGLE:
        fn = W.train if kind == "train" else W.one_step
        _SINGLE[key] = fn("single", device, world=world, **kw)
    return _SINGLE[key]
