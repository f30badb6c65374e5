"""The default warm path makes no host-GPU sync and no torch.linalg.svd / eigh call (both check
their convergence on the host), and its accuracy is the orthonormalisation's, the pass count's and
the small SVD's: each mutation of one of them fails the same check the real path passes.

CPU: a host sync needs a tensor's value on the host (item, tolist, bool, int, float, nonzero,
cpu, numpy); those are made to raise during a warm call. GPU: the call runs under
torch.cuda.set_sync_debug_mode("error"), which also sees copies and library calls that block.
"""
import contextlib

import pytest
import torch

import dpkern.denoise.rsvd as rsvd
from dpkern.denoise import RMTDenoiser
from tests.denoise.planted import drifting
from tests.denoise.test_warm_start import SHAPES, SIGMA, STRONG, WEAK, _check_close, _clone, _exact

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu",
              "numpy")
SYNCING_LINALG = ("svd", "svdvals", "eigh", "eigvalsh")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Reading a tensor's value on the host, or a host-checked decomposition, raises inside."""
    def refuse(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host read: {name}")
        return f
    with monkeypatch.context() as mp:
        for name in HOST_READS:
            mp.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in SYNCING_LINALG:
            mp.setattr(torch.linalg, name, refuse(f"torch.linalg.{name}"))
        mp.setattr(torch, "nonzero", refuse("torch.nonzero"))
        yield


def _warm_then_guarded(den, seq, guard):
    """Call den on every step; from the second on inside guard(). Returns the outputs."""
    outs = []
    for t, (_, noisy) in enumerate(seq):
        out = _clone(noisy)
        with guard() if t else contextlib.nullcontext():
            den(out, SIGMA)
        outs.append(out)
    return outs


def test_warm_call_reads_nothing_back(monkeypatch):
    seq = drifting(3, SHAPES, STRONG, SIGMA, seed=0)
    den = RMTDenoiser(seed=0, resync_every=0)
    outs = _warm_then_guarded(den, seq, lambda: no_host_reads(monkeypatch))
    assert den.last_stats["syncless"] and den.last_stats["passes_per_matrix"] == 4
    for (signal, noisy), out in zip(seq[1:], outs[1:]):
        _check_close(out, _exact(noisy), signal, 0.15, "guarded")
    # the guard is not vacuous: each of these reads a value back on the warm path
    for kw in (dict(warm_passes=None), dict(resync_every=1)):
        with pytest.raises(AssertionError, match="host read"):
            _warm_then_guarded(RMTDenoiser(seed=0, **kw), seq, lambda: no_host_reads(monkeypatch))


def _worst(seq, den):
    """Max over steps >= 1 and matrices of err / exact err and of ||out - exact|| / exact err."""
    ratio = diff = 0.0
    for t, (signal, noisy) in enumerate(seq):
        out = _clone(noisy)
        den(out, SIGMA)
        if t:
            ex = _exact(noisy)
            for k in signal:
                stat = float((ex[k] - signal[k]).norm())
                ratio = max(ratio, float((out[k] - signal[k]).norm()) / stat)
                diff = max(diff, float((out[k] - ex[k]).norm()) / stat)
    return ratio, diff


def _no_orth(y, orth="cholqr2", **padding):
    # the mutation: the block is left as it is (its columns are not orthonormalised)
    b, _, l = y.shape
    return y, torch.eye(l, dtype=torch.float64).expand(b, l, l)


@pytest.mark.parametrize("xs, frac", [(STRONG, 0.15), (WEAK, 0.3)], ids=["strong", "near-edge"])
def test_fixed_warm_path_matches_exact_and_mutations_fail(monkeypatch, xs, frac):
    # The policy of test_warm_start (error to signal <= 1.02x the exact SVD's, distance to it
    # <= frac of its error) on 6 drifting steps; measured (CPU, this seed): strong 0.994 / 0.10,
    # near-edge 1.013 / 0.21 at the default 4 passes. Two passes (one round trip from the
    # carried vectors): strong 1.014 / 0.30, near-edge 1.050 / 0.33; without the
    # orthonormalisation: 4.7 / 4.6 and 1.7 / 1.4. (Without the small SVD's QR steps: 0.992 /
    # 0.15, 1.010 / 0.25: within the policy, so no mutation of it here.)
    seq = drifting(6, SHAPES, xs, SIGMA, seed=3, delta=0.05)
    ratio, diff = _worst(seq, RMTDenoiser(seed=3))
    assert ratio <= 1.02 and diff <= frac, (ratio, diff)
    bad = [_worst(seq, RMTDenoiser(seed=3, warm_passes=2))]   # a pass pair short
    with monkeypatch.context() as mp:                        # no orthonormalisation
        mp.setattr(rsvd, "orthonormalize", _no_orth)
        bad.append(_worst(seq, RMTDenoiser(seed=3, resync_every=0)))
    for r, d in bad:
        assert r > 1.02 or d > frac, (r, d)
