"""Noise statistics of the released update: std sigma*C/B within 1%, mean, KS, tail mass beyond 4
sigma; the same check must fail when sigma is off by 5%."""
import math

import pytest
import torch
from scipy import stats

import dpkern
from dpkern.noise import NoiseGenerator, SGDHyper, fused_noisy_step

SIGMA_C, B = 3.0, 16.0


def _released_noise(n: int, noise_std: float, device: str, backend: str, seed: int = 1):
    """p = 0, g = 0, SGD lr = 1: the update writes -(noise_std * z) / B, i.e. the released noise."""
    p = torch.zeros(n, device=device)
    fused_noisy_step([p], [torch.zeros(n, device=device)], hyper=SGDHyper(lr=1.0),
                     noise_std=noise_std, expected_batch_size=B,
                     noise=NoiseGenerator(secure=False, seed=seed), backend=backend)
    return -p.double().cpu()


def check_noise_stats(x: torch.Tensor, target_std: float) -> None:
    """Asserts mean ~ 0, std within 1% of target, KS against N(0, target_std), 4-sigma tail mass."""
    n = x.numel()
    mean, std = x.mean().item(), x.std().item()
    assert abs(mean) < 5 * target_std / math.sqrt(n), f"mean {mean} is off"
    assert abs(std / target_std - 1) < 0.01, f"std {std} is not within 1% of {target_std}"
    ks = stats.kstest((x / target_std).numpy(), "norm")
    assert ks.pvalue > 1e-4, f"KS rejects N(0, {target_std}): p = {ks.pvalue}"
    tail_p = 2 * stats.norm.sf(4.0)
    count = (x.abs() > 4 * target_std).sum().item()
    sd = math.sqrt(n * tail_p * (1 - tail_p))
    assert abs(count - n * tail_p) < 5 * sd + 1, f"tail mass beyond 4 sigma: {count} vs {n * tail_p:.1f}"


def test_noise_statistics_cpu_reference():
    x = _released_noise(1_000_000, SIGMA_C, "cpu", "torch")
    check_noise_stats(x, SIGMA_C / B)


def test_std_check_fails_when_sigma_is_off_by_5_percent():
    x = _released_noise(1_000_000, SIGMA_C * 1.05, "cpu", "torch")
    with pytest.raises(AssertionError, match="std"):
        check_noise_stats(x, SIGMA_C / B)
    x = _released_noise(1_000_000, SIGMA_C * 0.95, "cpu", "torch", seed=2)
    with pytest.raises(AssertionError, match="std"):
        check_noise_stats(x, SIGMA_C / B)


def test_noise_is_zero_when_sigma_is_zero():
    assert torch.equal(_released_noise(1000, 0.0, "cpu", "torch"), torch.zeros(1000, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_noise_statistics_gpu(backend):
    if backend == "cuda" and not dpkern.cuda_available():
        pytest.skip("CUDA extension not built")
    x = _released_noise(10_000_000, SIGMA_C, "cuda", backend)
    check_noise_stats(x, SIGMA_C / B)
    x = _released_noise(10_000_000, SIGMA_C * 1.05, "cuda", backend)
    with pytest.raises(AssertionError, match="std"):
        check_noise_stats(x, SIGMA_C / B)
