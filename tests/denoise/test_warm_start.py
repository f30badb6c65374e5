"""Warm-started denoising across steps: the result matches the exact-SVD denoise of each step,
changes of subspace are caught, far fewer GEMM passes than the cold path, and the state is a
checkpointable starting guess only (reset, unknown or garbage state = the cold behaviour or
the same tolerance).

Two warm paths: the default, a fixed `warm_passes` (4) with no host sync, and the adaptive one
(`warm_passes=None`: convergence test, a sync per pass). A change the warm start cannot foresee
(subspace replaced, a direction out of pure noise, another run's state) is caught the same
step by the adaptive path only; the fixed path pays for it in accuracy at that step (measured
error to signal up to 1.12x the exact's, held to 1.2x) and is back within the policy below the
step after, once its state holds the new directions.

Tolerance policy (random-matrix data, fixed seeds; numbers measured at these seeds and sizes):
  - error to the planted signal: within 2 % of the exact-SVD denoise's, per matrix and step
    (measured -0.7 % to +1.1 %; the warm start is often closer to the signal than the exact
    SVD: it leans on the last step's vectors, whose noise is independent of this step's);
  - distance to the exact-SVD denoise: at most `FRAC` of the exact denoise's own error to the
    signal (its statistical error), FRAC = 0.15 for a strong signal (measured <= 0.08) and 0.3
    when values sit near the bulk edge (measured <= 0.22, mostly from values that cross the
    threshold in one output and not the other; the cold path measures <= 0.06 there).
"""
import io

import pytest
import torch

from dpkern.denoise import RMTDenoiser, denoise_matrices_
from dpkern.denoise.rsvd import adaptive_svd, exact_svd, subspace_iteration
from dpkern.denoise.shrinkers import bulk_edge
from tests.denoise.planted import drifting, planted

SIGMA = 1e-3
SHAPES = {"l0.q.weight": (160, 400), "l0.o.weight": (160, 160), "l0.down.weight": (400, 160)}
STRONG = [10.0, 6.0, 4.0, 3.0, 2.0, 1.5]
WEAK = [3.0 / j for j in range(1, 9)]       # the benchmark's decaying profile: 2-3 above the edge
COLD_PASSES = 2 * 5 + 2                     # n_iter = 5, no reruns


def _clone(d):
    return {k: v.clone() for k, v in d.items()}


def _exact(noisy):
    out = _clone(noisy)
    RMTDenoiser(method="exact")(out, SIGMA)
    return out


def _check_close(out, exact, signal, frac, where):
    for k in signal:
        stat = float((exact[k] - signal[k]).norm())
        err = float((out[k] - signal[k]).norm())
        assert err <= 1.02 * stat, (where, k, err / stat)
        assert float((out[k] - exact[k]).norm()) <= frac * stat, (where, k)


@pytest.mark.parametrize("xs, frac", [(STRONG, 0.15), (WEAK, 0.3)], ids=["strong", "near-edge"])
@pytest.mark.parametrize("seed", [0, 1])
def test_slow_drift_matches_exact_with_fewer_passes(xs, frac, seed):
    seq = drifting(6, SHAPES, xs, SIGMA, seed, delta=0.05)
    warm, cold = RMTDenoiser(seed=seed), RMTDenoiser(seed=seed, warm_start=False)
    warm_passes = []
    for t, (signal, noisy) in enumerate(seq):
        w, c = _clone(noisy), _clone(noisy)
        warm(w, SIGMA)
        cold(c, SIGMA)
        _check_close(w, _exact(noisy), signal, frac, t)
        assert cold.last_stats["passes_per_matrix"] == COLD_PASSES and cold.last_stats["warm"] == 0
        if t == 0:                        # no state yet: the cold path, bit for bit
            assert all(torch.equal(w[k], c[k]) for k in w)
            assert warm.last_stats["passes_per_matrix"] == COLD_PASSES
        else:
            assert warm.last_stats["warm"] == len(SHAPES)
            assert warm.last_stats["unconverged"] == 0
            warm_passes.append(warm.last_stats["passes_per_matrix"])
    # measured 4.7-7.3 per matrix (at least 4: min_iter = 1); cold 12
    assert max(warm_passes) <= 0.65 * COLD_PASSES
    assert sum(warm_passes) / len(warm_passes) <= 0.5 * COLD_PASSES


@pytest.mark.parametrize("seed", [0, 1])
def test_abrupt_change_of_subspace_is_caught(seed):
    # At step 3 every matrix's signal moves to new random subspaces: the carried vectors are
    # stale. The fresh random columns pick the new subspace up, the (adaptive path's)
    # convergence test sees the kept values move and keeps iterating, and the result still
    # matches the exact SVD.
    seq = drifting(5, SHAPES, STRONG, SIGMA, seed, abrupt_at=(3,))
    den = RMTDenoiser(seed=seed, warm_passes=None)
    passes = []
    for t, (signal, noisy) in enumerate(seq):
        if t == 3:
            stale = den.state_dict()
        out = _clone(noisy)
        den(out, SIGMA)
        _check_close(out, _exact(noisy), signal, 0.15, t)
        passes.append(den.last_stats["passes_per_matrix"])
    assert passes[3] > max(passes[1], passes[2], passes[4])      # the change cost iterations
    # Sharpness of the check: the stale warm start with the test switched off and only its first
    # two passes (the stale subspace plus one crude random sketch) fails it, on either path.
    signal, noisy = seq[3]
    names = list(SHAPES)
    exact = _exact(noisy)
    for kw in (dict(n_iter=0, warm_passes=None), dict(warm_passes=2)):
        mats = [noisy[k].clone() for k in names]
        denoise_matrices_(mats, SIGMA, warm_start=[stale["matrices"][k]["v"] for k in names], **kw)
        assert any(float((m - exact[k]).norm()) > 0.5 * float((exact[k] - signal[k]).norm())
                   for m, k in zip(mats, names)), kw


def _changes():
    """(name, sequence, index of the unforeseen step, denoiser seed, prior state or None)."""
    out = [(f"abrupt-{seed}", drifting(5, SHAPES, STRONG, SIGMA, seed, abrupt_at=(3,)), 3, seed,
            None) for seed in (0, 1)]
    out += [(f"appear-{x}", drifting(5, SHAPES, [x], SIGMA, seed=4, appear_at=3), 3, 2, None)
            for x in (1.6, 3.0)]
    out.append(("garbage", drifting(3, SHAPES, STRONG, SIGMA, seed=8)[1:], 0, 4,
                drifting(2, SHAPES, STRONG, SIGMA, seed=7)[1][1]))
    return out


@pytest.mark.parametrize("name, seq, change, seed, prior", _changes(),
                         ids=[c[0] for c in _changes()])
def test_fixed_passes_pay_an_unforeseen_change_for_one_step(name, seq, change, seed, prior):
    # The sync-free path cannot iterate longer when the start is stale: at the change its error
    # to the signal is held to 1.2x the exact SVD's (measured <= 1.12x, at x = 1.6, a value
    # just above the detection threshold), and from the next step on to the usual policy.
    den = RMTDenoiser(seed=seed)
    if prior is not None:
        den(_clone(prior), SIGMA)
    for t, (signal, noisy) in enumerate(seq):
        out = _clone(noisy)
        den(out, SIGMA)
        assert den.last_stats["syncless"] == (t > 0 or prior is not None), t
        if t < change or float(next(iter(signal.values())).norm()) == 0:
            continue
        exact = _exact(noisy)
        if t == change:
            for k in signal:
                assert float((out[k] - signal[k]).norm()) <= 1.2 * float((exact[k] - signal[k]).norm())
        else:
            _check_close(out, exact, signal, 0.3, t)


@pytest.mark.parametrize("x", [1.6, 3.0])
def test_new_direction_after_pure_noise_is_caught_the_same_step(x):
    # Pure noise for 3 steps (nothing kept: the carried vectors are noise directions), then a
    # rank-1 signal appears: the step it appears, the warm path keeps what the exact SVD keeps.
    seq = drifting(5, SHAPES, [x], SIGMA, seed=4, appear_at=3)
    den = RMTDenoiser(seed=2, warm_passes=None)                      # the adaptive path
    for t, (signal, noisy) in enumerate(seq):
        out, exact = _clone(noisy), _exact(noisy)
        den(out, SIGMA)
        ex = RMTDenoiser(method="exact")
        ex(_clone(noisy), SIGMA)
        if t >= 3:
            assert den.last_ranks == ex.last_ranks, t
            _check_close(out, exact, signal, 0.15, t)
        else:
            assert den.last_stats["passes_per_matrix"] == (COLD_PASSES if t == 0 else 4)


def test_reset_unknown_name_and_new_shape_are_cold():
    seq = drifting(3, SHAPES, STRONG, SIGMA, seed=5)
    den, cold = RMTDenoiser(seed=1), RMTDenoiser(seed=1, warm_start=False)
    for _, noisy in seq[:2]:
        den(_clone(noisy), SIGMA)
        cold(_clone(noisy), SIGMA)
    den.reset()
    a, b = _clone(seq[2][1]), _clone(seq[2][1])
    den(a, SIGMA)
    cold(b, SIGMA)
    assert den.last_stats["warm"] == 0 and all(torch.equal(a[k], b[k]) for k in a)
    # a name whose shape changed is cold; the others stay warm
    den2 = RMTDenoiser(seed=1)
    den2(_clone(seq[0][1]), SIGMA)
    g = _clone(seq[1][1])
    g["l0.o.weight"] = g["l0.o.weight"][:150].clone()
    den2(g, SIGMA)
    assert den2.last_stats["warm"] == len(SHAPES) - 1
    assert tuple(den2.state_dict()["matrices"]["l0.o.weight"]["shape"]) == (150, 160)


def test_state_dict_round_trip_and_refusals():
    seq = drifting(4, SHAPES, STRONG, SIGMA, seed=6)
    den = RMTDenoiser(seed=3)
    for _, noisy in seq[:2]:
        den(_clone(noisy), SIGMA)
    buf = io.BytesIO()
    torch.save(den.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = RMTDenoiser(seed=3)
    resumed.load_state_dict(state)
    assert resumed.calls == 2
    for _, noisy in seq[2:]:
        a, b = _clone(noisy), _clone(noisy)
        den(a, SIGMA)
        resumed(b, SIGMA)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert resumed.last_stats["warm"] == len(SHAPES)
    good = den.state_dict()
    before = resumed.state_dict()
    k0 = next(iter(good["matrices"]))
    e0 = good["matrices"][k0]
    bad_entries = [dict(e0, v=torch.full_like(e0["v"], float("nan"))), dict(e0, v=e0["v"][:-1]),
                   dict(e0, shape=[0, 5]), dict(e0, kept=-1)]
    for entry in bad_entries:
        with pytest.raises(ValueError, match="bad entry"):
            resumed.load_state_dict({"calls": 9, "matrices": {**good["matrices"], k0: entry}})
    for bad in ({"calls": -1, "matrices": {}}, {"matrices": {}}, {"calls": 1, "matrices": []}):
        with pytest.raises(ValueError, match="load_state_dict"):
            resumed.load_state_dict(bad)
    after = resumed.state_dict()                                    # nothing changed
    assert after["calls"] == before["calls"]
    assert all(torch.equal(after["matrices"][k]["v"], before["matrices"][k]["v"])
               for k in before["matrices"])


def test_garbage_state_is_only_a_starting_guess():
    # Vectors from an unrelated run (or anything finite) cost iterations, never accuracy.
    other = drifting(2, SHAPES, STRONG, SIGMA, seed=7)
    seq = drifting(2, SHAPES, STRONG, SIGMA, seed=8)
    den = RMTDenoiser(seed=4, warm_passes=None)    # the adaptive path (the fixed one: above)
    den(_clone(other[1][1]), SIGMA)                                 # state of another signal
    signal, noisy = seq[1]
    out = _clone(noisy)
    den(out, SIGMA)
    assert den.last_stats["warm"] == len(SHAPES)
    _check_close(out, _exact(noisy), signal, 0.15, "garbage")


def test_pass_counts_and_bytes():
    _, noisy = planted(3, 64, 160, [5.0, 2.0], SIGMA, seed=1, dtype=torch.float32)
    info = {}
    denoise_matrices_(list(noisy.clone()), SIGMA, n_iter=3, info=info)
    assert info["passes"] == 3 * (2 * 3 + 2) and info["reruns"] == 0
    assert info["pass_bytes"] == info["passes"] * 64 * 160 * 4 and info["numel"] == 3 * 64 * 160
    # a rerun at twice the rank re-reads only the matrices that need it
    _, many = planted(2, 64, 160, [8.0 - 0.5 * i for i in range(6)], SIGMA, seed=2,
                      dtype=torch.float32)
    mats = [many[0].clone(), noisy[0].clone()]
    denoise_matrices_(mats, SIGMA, rank=2, oversample=4, n_iter=2, info=info)
    assert info["reruns"] >= 1 and info["passes"] == 2 * 6 + info["reruns"] * 6
    # noise_std = 0: nothing is read
    denoise_matrices_(list(noisy.clone()), 0.0, info=info)
    assert info["passes"] == 0 and info["pass_bytes"] == 0


def test_converged_triplets_meet_the_residual_bound():
    # With a warm start from nearby vectors the iteration stops early, and every kept value is
    # within its residual of a true singular value; a start from garbage with a cap of one
    # iteration is reported as unconverged.
    m, n = 120, 300
    _, a = planted(2, m, n, [8.0, 5.0, 3.0], SIGMA, seed=3, dtype=torch.float32)
    thr = torch.full((2,), bulk_edge(m, n, SIGMA))
    se = exact_svd(a.double())[1]
    v = exact_svd(a)[2][:, :3].mT                                   # (2, n, 3)
    g = torch.Generator().manual_seed(0)
    omega = torch.cat([v, torch.randn(2, n, 13, generator=g)], -1)
    st = {}
    u, s, vh = subspace_iteration(a, omega, 8, n_iter=5, tol=0.05, min_iter=0, threshold=thr,
                                  stats=st)
    assert st["passes"] == 2 * 2 and st["unconverged"] == 0          # converged at the first test
    torch.testing.assert_close(s[:, :3].double(), se[:, :3], rtol=1e-4, atol=0)
    st = {}
    omega = torch.randn(2, n, 16, generator=g)
    subspace_iteration(a, omega, 8, n_iter=1, tol=1e-6, min_iter=0, threshold=thr, stats=st)
    assert st["passes"] == 2 * 4 and st["unconverged"] == 2
    # adaptive_svd: warm matrices get the test, cold ones the fixed count, in one stack
    st = {}
    adaptive_svd(a, thr, rank=8, oversample=8, n_iter=5, tol=0.05, min_iter=0,
                 v0=[v[0], None], stats=st)
    assert st["passes"] == COLD_PASSES * 2                          # the cold one sets the pace
