"""The clip bound on adversarial inputs: every sample's released contribution, in float64 from the
operands exactly as the kernels see them (TF32-rounded in "tf32r"), has norm ≤ C.

A Linear layer gets chosen activations a and output gradients g (loss Σ ⟨y, g⟩, reduction "sum"),
so sample i's gradient is g_iᵀ a_i. Kinds: "cancellation" (token pairs that nearly cancel: the
fp32 norm's error is relative to the no-cancellation norm, far above ‖G_i‖), "tf32_hard" (values
that TF32 rounds up), "dynamic_range" (±2^12 scales). A mutation (bounds slightly below the
norms) shows the check can fail."""
import pytest
import torch
from torch import nn

from dpkern import PrivacyEngine
from dpkern.ops._persample import operand
from tests.conftest import HAS_GPU

B, T, D, P = 6, 63, 60, 33
KINDS = ("cancellation", "tf32_hard", "dynamic_range")


def adversarial(kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if kind == "cancellation":  # pairs (a, g), (a(1 + δ), -g(1 + δ')): Σ_t g_t a_tᵀ nearly 0
        half = (T + 1) // 2
        a = 1 + torch.rand(B, half, D, generator=gen) * 2**-10
        g = 1 + torch.rand(B, half, P, generator=gen) * 2**-10
        delta = 3e-3 * torch.logspace(0, 2, B).view(B, 1, 1)  # κ from ~1e3 down to ~10
        a2 = a * (1 + torch.randn(a.shape, generator=gen) * delta)
        g2 = -g * (1 + torch.randn(g.shape, generator=gen) * delta)
        return (torch.stack([a, a2], 2).reshape(B, -1, D)[:, :T].contiguous(),
                torch.stack([g, g2], 2).reshape(B, -1, P)[:, :T].contiguous())
    if kind == "tf32_hard":  # mantissas just above a TF32 tie: rounded up by 2^-11 relative
        def hard(*shape):
            sign = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
            return sign * (1 + 3 * 2**-12) * torch.exp2(torch.randint(-3, 4, shape, generator=gen).float())
        return hard(B, T, D), hard(B, T, P)
    e = lambda *s: torch.exp2(torch.randint(-12, 13, s, generator=gen).float())  # noqa: E731
    return torch.randn(B, T, D, generator=gen) * e(B, T, D), torch.randn(B, T, P, generator=gen) * e(B, T, P)


class _Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, P, bias=False)

    def forward(self, a, g):
        return (self.lin(a) * g).sum()  # d/dW: Σ_i g_iᵀ a_i, output grad exactly g


def _released(kind, mode, backend, monkeypatch, seed=0):
    """(float64 ‖scale_i G̃_i‖ per sample, N̂_i, U_i, C, G̃ norms) for one engine backward."""
    monkeypatch.setenv("DPKERN_FP32_DOT", mode)
    monkeypatch.delenv("DPKERN_NORM_FP32_DOT", raising=False)
    a, g = adversarial(kind, seed)
    exact = torch.einsum("btp,btd->bpd", operand(g, mode, torch.float64),
                         operand(a, mode, torch.float64)).flatten(1).norm(dim=1)
    c = float(exact.median())  # about half the samples are clipped
    model = _Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt, _ = PrivacyEngine(accountant="rdp", backend=backend).make_private(
        module=model, optimizer=opt, data_loader=None, noise_multiplier=0.0, max_grad_norm=c,
        loss_reduction="sum", expected_batch_size=B, sample_rate=0.1)
    model(a, g).backward()
    n2, u = opt.last_clip["lin.weight"]
    scale = opt.last_scales["lin.weight"].double()
    opt.zero_grad()
    return scale * exact, n2.sqrt(), u, c, exact


@pytest.mark.parametrize("mode", ["ieee", "tf32r"])
@pytest.mark.parametrize("kind", KINDS)
def test_released_contribution_at_most_c(kind, mode, monkeypatch):
    released, n_hat, bound, c, exact = _released(kind, mode, "torch", monkeypatch)
    assert (released <= c).all(), (released / c).max()
    assert (bound >= exact).all()  # the bound bounds the exact norm of the rounded operands
    assert (exact > c).sum() >= B // 3  # clipping really happens


@pytest.mark.skipif(HAS_GPU, reason="interpreter run on CPU tensors; the GPU runs the kernels")
def test_released_contribution_at_most_c_triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    released, _, _, c, _ = _released("cancellation", "tf32r", "triton", monkeypatch, seed=1)
    assert (released <= c).all(), (released / c).max()


def test_check_catches_a_bound_below_the_norm(monkeypatch):
    """Control (mutation): bounds 1e-4 below the fp32 norms make clipped contributions exceed C."""
    import dpkern.engine as engine_mod
    real = engine_mod.release_bound_matrix
    monkeypatch.setattr(engine_mod, "release_bound_matrix", lambda uses, params, norms, **kw:
                        torch.stack([n.double().sqrt() * (1 - 1e-4) for n in norms]))
    released, _, _, c, _ = _released("dynamic_range", "ieee", "torch", monkeypatch)
    assert (released > c).any()
    monkeypatch.setattr(engine_mod, "release_bound_matrix", real)
