"""loss_reduction="sum" with average_sum=True releases the same update as "mean" (fp32, same noise
key), on the fused and the materialised path; bad combinations are refused."""
import copy

import pytest
import torch
from torch import nn

from dpkern import PrivacyEngine


def _step(reduction, average_sum, fused, sigma=1.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    base = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # SGD: scale-sensitive
    model, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=None, noise_multiplier=sigma, max_grad_norm=0.3,
        expected_batch_size=8, sample_rate=0.1, seed=11, loss_reduction=reduction,
        average_sum=average_sum)
    opt.fused = fused
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))  # realized 7, expected 8
    losses = model(x).square().sum(dim=1)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    opt.step()
    return [p.detach() - q.detach() for p, q in zip(model.parameters(), base.parameters())]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_average_sum_equals_mean(fused, sigma):
    mean = _step("mean", False, fused, sigma)
    avg = _step("sum", True, fused, sigma)
    plain_sum = _step("sum", False, fused, sigma)
    for a, b in zip(mean, avg):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, c in zip(mean, plain_sum):  # control: without average_sum the update is the sum, 8x
        torch.testing.assert_close(8 * a, c, rtol=1e-4, atol=1e-6)


def test_average_sum_needs_sum():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="average_sum"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
                                     data_loader=None, noise_multiplier=1.0, max_grad_norm=1.0,
                                     expected_batch_size=4, sample_rate=0.1, average_sum=True)
