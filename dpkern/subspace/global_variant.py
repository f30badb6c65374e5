"""The paper's global-trajectory DP-SFT for SMALL models (|θ| × k fits in memory).

Stage 1 keeps Θ(j) − Θ(0) of the whole flattened trainable vector every ⌊T1/k⌋ steps (released
outputs of a DP run the caller charged to the accountant); P = top-k right singular vectors of the
stacked (k × |θ|) matrix. Stage 2 (`GlobalSubspaceDPSGD`): per-sample gradients (torch.func),
g_i^s = Pᵀ g_i (k), clip to C, sum, + N(0, σ²C² I_k) from dpkern.noise, θ ← θ − lr P g̃^s / B.
The per-layer form (engine.py) is the one that scales; this exists to reproduce the paper's shape.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from dpkern.noise import NoiseGenerator

__all__ = ["global_trajectory_basis", "GlobalSubspaceDPSGD", "flat_params"]


def flat_params(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def global_trajectory_basis(snapshots: torch.Tensor, k: int) -> torch.Tensor:
    """snapshots (m, n): rows Θ(j) − Θ(0). Returns P (n, k) fp32: the top-k right singular
    vectors (orthonormal columns). Needs k <= min(m, n)."""
    if snapshots.dim() != 2:
        raise ValueError(f"snapshots must be (m, n), got shape {tuple(snapshots.shape)}")
    m, n = snapshots.shape
    if not 1 <= int(k) <= min(m, n):
        raise ValueError(f"k must be in [1, min(m, n) = {min(m, n)}], got {k}")
    _, _, vh = torch.linalg.svd(snapshots.double(), full_matrices=False)
    return vh[:k].T.float().contiguous()


class GlobalSubspaceDPSGD:
    """DP-SGD with the update restricted to span(P) over the model's trainable parameters.

    Args:
        model: small module; its trainable parameters (model order) form θ (n elements).
        basis: P (n, k), orthonormal columns.
        loss_fn: loss_fn(model_output, target) -> scalar for ONE sample (called under vmap).
        noise_multiplier, max_grad_norm, expected_batch_size, lr: σ, C, B_expected, step size.
        accountant: a dpkern accountant (e.g. the stage-1 engine's) charged (σ, sample_rate) per step.
        seed: deterministic noise (tests only); default secret key.
    """

    def __init__(self, model, basis, loss_fn, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, lr: float, accountant, sample_rate: float,
                 seed: int | None = None):
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in self.params)
        if basis.dim() != 2 or basis.shape[0] != n:
            raise ValueError(f"basis must be ({n}, k) for this model, got {tuple(basis.shape)}")
        if float(max_grad_norm) <= 0 or float(noise_multiplier) < 0 or int(expected_batch_size) <= 0:
            raise ValueError("need max_grad_norm > 0, noise_multiplier >= 0, expected_batch_size > 0")
        self.P = basis.detach().float()
        self.loss_fn = loss_fn
        self.sigma, self.C = float(noise_multiplier), float(max_grad_norm)
        self.B, self.lr, self.q = int(expected_batch_size), float(lr), float(sample_rate)
        self.accountant = accountant
        self.noise = NoiseGenerator() if seed is None else NoiseGenerator(secure=False, seed=seed)

    def per_sample_coords(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, k) fp64 projected per-sample gradients Pᵀ g_i."""
        if x.shape[0] == 0:
            return torch.zeros(0, self.P.shape[1], dtype=torch.float64, device=self.P.device)
        pdict = {n: p.detach() for n, p in zip(self.names, self.params)}

        def one(pd, xi, yi):
            out = functional_call(self.model, pd, (xi.unsqueeze(0),))
            return self.loss_fn(out, yi.unsqueeze(0))

        gs = vmap(grad(one), in_dims=(None, 0, 0))(pdict, x, y)
        flat = torch.cat([gs[n].reshape(x.shape[0], -1) for n in self.names], dim=1)
        return flat.double() @ self.P.double().to(flat.device)

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One DP step on the Poisson batch (x, y) (may be empty). Returns the released g̃^s / B."""
        with torch.enable_grad():
            s = self.per_sample_coords(x, y)
        nrm = s.norm(dim=1) * (1.0 + 2.0 ** -28)
        ok = torch.isfinite(nrm)
        c = torch.where(ok & (nrm > self.C), self.C / nrm, ok.double())
        total = (c.unsqueeze(1) * torch.where(ok.unsqueeze(1), s, 0.0)).sum(0)
        z = torch.zeros(self.P.shape[1], dtype=torch.float32, device=self.P.device)
        if self.sigma > 0:
            from dpkern.mechanisms.noise_ops import gaussian_noise_add_
            step = self.noise.next_step()
            gaussian_noise_add_(z, std=self.sigma * self.C, words=self.noise.kernel_words(step),
                                offset=0)
        released = ((total.to(z.device) + z.double()) / self.B).float()
        upd = (self.P @ released).to(self.params[0].device)
        off = 0
        for p in self.params:
            p.add_(upd[off:off + p.numel()].view_as(p).to(p.dtype), alpha=-self.lr)
            off += p.numel()
        self.accountant.step(noise_multiplier=self.sigma, sample_rate=self.q)
        return released
