"""Plain-PyTorch ground truth for the subspace ops: forms every per-sample gradient G_i explicitly."""
from __future__ import annotations

import torch


def per_sample_grads_ref(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G_i = g_iᵀ a_i in float64: a (B, T, d), g (B, T, p) -> (B, p, d)."""
    return torch.einsum("btp,btd->bpd", g.double(), a.double())


def subspace_project_ref(a: torch.Tensor, g: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
    """(S, ‖S‖²) in float64 with S_i = Uᵀ G_i V, G_i formed explicitly (slow, obviously right).

    a (B, T, d), g (B, T, p), u (p, RU), v (d, RV) -> S (B, RU, RV), norms (B,).
    """
    G = per_sample_grads_ref(a, g)
    s = torch.einsum("pr,bpd,ds->brs", u.double(), G, v.double())
    return s, s.square().sum(dim=(1, 2))
