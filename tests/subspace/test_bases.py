"""Basis sources: sketches recover a known low-rank subspace; public gradients; the paper's
global-trajectory variant (full rank = clipped per-sample mean; accountant charged)."""
import pytest
import torch

from dpkern.accounting import create_accountant
from dpkern.subspace import (GlobalSubspaceDPSGD, LowRankSketch, flat_params,
                             global_trajectory_basis, orthonormalize, public_gradient_bases)


def _proj_err(q, basis):
    """‖(I − Q Qᵀ) B‖ / ‖B‖: how much of span(B) lies outside span(Q)."""
    return float((basis - q @ (q.T @ basis)).norm() / basis.norm())


@pytest.mark.parametrize("exact", [True, False])
def test_sketch_recovers_low_rank_stack(exact):
    g = torch.Generator().manual_seed(0)
    p, d, r = 40, 30, 3
    a, b = orthonormalize(torch.randn(p, r, generator=g)), orthonormalize(torch.randn(d, r, generator=g))
    sk = LowRankSketch((p, d), r, exact=exact, seed=1)
    for _ in range(5):
        sk.add(a @ torch.randn(r, r, generator=g) @ b.T + 1e-4 * torch.randn(p, d, generator=g))
    u, v = sk.bases()
    assert u.shape == (p, r) and v.shape == (d, r)
    torch.testing.assert_close(u.T @ u, torch.eye(r), rtol=0, atol=1e-5)
    assert _proj_err(u, a) < 5e-3 and _proj_err(v, b) < 5e-3  # noise level 1e-4·√(pd)
    assert _proj_err(u, orthonormalize(torch.randn(p, r, generator=g))) > 0.5  # not everything


def test_sketch_bad_input():
    with pytest.raises(ValueError, match="rank"):
        LowRankSketch((4, 3), 4)
    sk = LowRankSketch((4, 3), 2)
    with pytest.raises(RuntimeError, match="no matrix"):
        sk.bases()
    with pytest.raises(ValueError, match="expected"):
        sk.add(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="rank"):
        orthonormalize(torch.zeros(3, 2), 4)


def test_public_gradient_bases_capture_public_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    x = torch.randn(1, 8)

    def loss(m, xb):
        return m(xb).square().sum()
    bases = public_gradient_bases(model, [x], loss, ["0", "2.weight"], rank=1, exact=True)
    g0 = torch.autograd.grad(loss(model, x), model[0].weight)[0]  # rank 1 (one sample)
    u, v = bases["0"]
    torch.testing.assert_close((u.T @ g0 @ v).norm(), g0.norm(), rtol=1e-5, atol=0)


def test_public_bases_refuse_private_model():
    from dpkern.engine import PrivacyEngine
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=None, noise_multiplier=1.0, max_grad_norm=1.0,
                                 expected_batch_size=2, sample_rate=0.1)
    with pytest.raises(RuntimeError, match="private"):
        public_gradient_bases(model, [torch.randn(1, 4)], lambda m, b: m(b).sum(), ["0"], 1)


def test_global_trajectory_basis():
    g = torch.Generator().manual_seed(0)
    dirs = orthonormalize(torch.randn(50, 2, generator=g))
    snaps = (dirs @ torch.randn(2, 6, generator=g)).T  # 6 snapshots in a 2-D subspace
    p = global_trajectory_basis(snaps, 2)
    assert p.shape == (50, 2) and _proj_err(p, dirs) < 1e-5
    with pytest.raises(ValueError, match="k must be"):
        global_trajectory_basis(snaps, 7)


def test_global_variant_full_rank_is_clipped_mean_and_charged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    n = sum(p.numel() for p in model.parameters())
    acc = create_accountant("rdp")
    ce = torch.nn.functional.cross_entropy
    dp = GlobalSubspaceDPSGD(model, torch.eye(n), ce, noise_multiplier=0.0, max_grad_norm=0.1,
                             expected_batch_size=4, lr=1.0, accountant=acc, sample_rate=0.1)
    x, y = torch.randn(5, 4) * 3, torch.randint(0, 2, (5,))
    theta0 = flat_params(model.parameters())
    per = []
    for i in range(5):
        model.zero_grad()
        ce(model(x[i:i + 1]), y[i:i + 1]).backward()
        per.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    per = torch.stack(per)
    c = torch.clamp(0.1 / per.norm(dim=1), max=1.0)
    expect = (c[:, None] * per).sum(0) / 4
    released = dp.step(x, y)
    torch.testing.assert_close(released.double(), expect, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat_params(model.parameters()), (theta0 - expect).float(),
                               rtol=0, atol=1e-6)
    dp.step(x[:0], y[:0])  # empty batch: still a step
    assert sum(n for _, _, n in acc.history) == 2 and acc.get_epsilon(1e-5) > 0
    with pytest.raises(ValueError, match="basis must be"):
        GlobalSubspaceDPSGD(model, torch.eye(n + 1), ce, noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=4, lr=1.0, accountant=acc, sample_rate=0.1)
