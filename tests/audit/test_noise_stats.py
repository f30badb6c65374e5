"""Released noise is N(0, (sigma C / B_expected)^2), fresh at every step, tensor, shard and resume.

The fused step is run with zero gradients, zero weights and plain SGD (lr = 1), so the new weights
are exactly -(sigma C z) / B_expected: the released noise. The same checks must fail when sigma is
off by 5% (a test that cannot fail is a defect). The engine-level version is in test_engine_audit.py.
"""
import pytest
import torch

from dpkern.audit.stats import correlation_report, gaussian_report
from dpkern.noise import NoiseGenerator, SGDHyper, fused_noisy_step

from tests.conftest import HAS_GPU

SIGMA, C, B = 1.3, 0.7, 25.0
STD = SIGMA * C / B


def released(shapes, gen, backend="torch", device="cpu", offsets=None):
    params = [torch.zeros(s, device=device) for s in shapes]
    grads = [torch.zeros(s, device=device) for s in shapes]
    fused_noisy_step(params, grads, hyper=SGDHyper(lr=1.0), noise_std=SIGMA * C,
                     expected_batch_size=B, noise=gen, global_offsets=offsets, backend=backend)
    return [-p for p in params]


@pytest.fixture(scope="module")
def million():
    """10^6 draws from the torch backend (the kernels match it bit for bit, see tests/noise)."""
    return released([(1000, 1000)], NoiseGenerator(secure=False, seed=11))[0]


def test_noise_std_ks_tails(million):
    rep = gaussian_report(million, STD)
    rep.assert_ok()
    assert abs(rep.values["std_ratio"] - 1) < 0.01


@pytest.mark.parametrize("factor", [1.05, 0.95])
def test_same_checks_fail_when_sigma_is_off(million, factor):
    """z is the same for the same (key, step), so a run with sigma * factor releases factor * this."""
    rep = gaussian_report(million * factor, STD)
    assert not rep.ok
    assert any("std" in f for f in rep.failures)


def test_checks_fail_on_non_gaussian_with_right_std(million):
    """Uniform noise with the right std passes the std check but not KS / tails."""
    g = torch.Generator().manual_seed(0)
    u = (torch.rand(million.numel(), generator=g, dtype=torch.float64) - 0.5) * (12 ** 0.5) * STD
    rep = gaussian_report(u, STD)
    assert abs(rep.values["std_ratio"] - 1) < 0.01 and not rep.ok


def test_too_few_draws_refused():
    assert not gaussian_report(torch.zeros(10), 1.0).ok


def test_fresh_noise_across_steps_and_tensors():
    gen = NoiseGenerator(secure=False, seed=3)
    a0, b0 = released([(100, 100), (100, 100)], gen)
    a1, b1 = released([(100, 100), (100, 100)], gen)
    correlation_report(a0, a1).assert_ok()    # step t vs t+1, same tensor
    correlation_report(a0, b0).assert_ok()    # two tensors, same step
    correlation_report(a0, b1).assert_ok()
    assert gen.step == 2                      # one counter step per release
    # the check is not vacuous: reused noise is caught
    assert not correlation_report(a0, a0.clone()).ok
    assert not correlation_report(a0, 0.5 * a0 + 0.01 * a1).ok


def test_shards_draw_the_unsharded_noise():
    """A tensor split over two shards (global offsets) gets exactly the noise of the whole."""
    whole = released([(4096,)], NoiseGenerator(secure=False, seed=5))[0]
    lo, hi = released([(1000,), (3096,)], NoiseGenerator(secure=False, seed=5), offsets=[0, 1000])
    assert torch.equal(torch.cat([lo, hi]), whole)
    # two different global offsets give independent noise
    x = released([(10_000,)], NoiseGenerator(secure=False, seed=5), offsets=[0])[0]
    y = released([(10_000,)], NoiseGenerator(secure=False, seed=5), offsets=[10_000])[0]
    correlation_report(x, y).assert_ok()


def test_resume_continues_the_counter_never_replays():
    gen = NoiseGenerator(secure=False, seed=9)
    first = [released([(5_000,)], gen)[0] for _ in range(3)]
    state = gen.state_dict()
    resumed = NoiseGenerator(secure=False, seed=123)
    resumed.load_state_dict(state)
    after = released([(5_000,)], resumed)[0]
    assert resumed.step == 4
    for f in first:
        correlation_report(f, after).assert_ok()
    # the uninterrupted run draws the same noise at step 3 as the resumed one
    cont = released([(5_000,)], gen)[0]
    assert torch.equal(cont, after)
    # loading an older state into the live generator would replay noise: refused
    with pytest.raises(ValueError, match="replay"):
        gen.load_state_dict(state)


def test_secure_checkpoint_has_no_key_and_resumes_past_step():
    gen = NoiseGenerator()
    for _ in range(2):
        released([(10,)], gen)
    st = gen.state_dict()
    assert "key" not in st and st["step"] == 2 and st["secure"] is True
    fresh = NoiseGenerator()
    fresh.load_state_dict(st)  # new key (the old one was never written), counter continues
    assert fresh.step == 2 and fresh.fingerprint != gen.fingerprint


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_noise_statistics_gpu(backend):
    if backend == "cuda" and not __import__("dpkern").cuda_available():
        pytest.skip("CUDA extension not built")
    gen = NoiseGenerator(secure=False, seed=21)
    x = released([(4096, 4096)], gen, backend=backend, device="cuda")[0]  # 1.7e7 draws
    gaussian_report(x, STD, min_draws=10_000_000).assert_ok()
    assert not gaussian_report(x * 1.05, STD, min_draws=10_000_000).ok
    y = released([(4096, 4096)], gen, backend=backend, device="cuda")[0]
    correlation_report(x, y).assert_ok()
    assert HAS_GPU
