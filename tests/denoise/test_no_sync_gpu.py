"""On the GPU a warm RMTDenoiser call only launches work: no host-GPU synchronisation (checked
by torch.cuda.set_sync_debug_mode("error"), which raises on a blocking copy, .item(), and on
torch.linalg.svd / eigh, which check convergence on the host). Skipped without a GPU."""
import contextlib

import pytest
import torch

from dpkern.denoise import RMTDenoiser
from tests.conftest import sync_is_an_error
from tests.denoise.planted import drifting
from tests.denoise.test_warm_start import SIGMA, STRONG, _check_close, _exact

pytestmark = pytest.mark.gpu

# two shapes up to transposition (2 stacks), large enough that l = k + 16 < min dim
SHAPES = {"l0.q.weight": (256, 640), "l0.o.weight": (256, 256), "l0.down.weight": (640, 256),
          "l1.q.weight": (256, 640)}


def _steps(den, steps, guarded):
    seq = drifting(steps, SHAPES, STRONG, SIGMA, seed=0)
    outs = []
    for t, (_, noisy) in enumerate(seq):
        grads = {k: v.cuda() for k, v in noisy.items()}
        torch.cuda.synchronize()
        with sync_is_an_error() if t in guarded else contextlib.nullcontext():
            den(grads, SIGMA)
        outs.append({k: v.cpu() for k, v in grads.items()})
    return seq, outs


def test_the_guard_catches_a_small_svd():
    with pytest.raises(RuntimeError, match="synchroniz"), sync_is_an_error():
        torch.linalg.svd(torch.randn(2, 8, 8, device="cuda", dtype=torch.float64))


def test_warm_calls_do_not_synchronise():
    den = RMTDenoiser(seed=0)                  # resync_every=16: calls 1..3 are all sync-free
    seq, outs = _steps(den, 4, guarded=(1, 2, 3))
    assert den.last_stats["syncless"] and den.last_stats["warm"] == len(SHAPES)
    for t in (1, 2, 3):                        # and they are right (CPU policy; fp32 on the GPU)
        signal, noisy = seq[t]
        _check_close(outs[t], _exact(noisy), signal, 0.15, t)
    assert all(r >= 4 for r in den.last_ranks.values())     # read back after the call


@pytest.mark.parametrize("kw", [dict(warm_passes=None), dict(resync_every=1)],
                         ids=["adaptive", "resync"])
def test_the_synchronous_warm_paths_are_caught(kw):
    with pytest.raises(RuntimeError, match="synchroniz"):
        _steps(RMTDenoiser(seed=0, **kw), 2, guarded=(1,))
