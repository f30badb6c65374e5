"""Ground truth: each sample's gradient by its own backward pass, in float64; clipping in float64."""
from __future__ import annotations

import copy
import math

import torch

from dpkern.losses import per_sample_losses


def per_sample_grads(model, batch: dict) -> dict:
    """{name: (B, *shape) float64} for every trainable parameter (model left untouched)."""
    ref = copy.deepcopy(model).double()
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    bsz = batch["input_ids"].shape[0]
    out = {n: torch.zeros(bsz, *p.shape, dtype=torch.float64) for n, p in named}
    for i in range(bsz):
        sub = {k: v[i:i + 1] for k, v in batch.items()}
        loss = per_sample_losses(ref, sub)[0]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None:
                out[n][i] = g
    return out


def clipped_mean(psg: dict, clipping: str, c: float, b_expected: int, gamma: float = 0.01) -> dict:
    """{name: (1 / B_expected) Σ_i clip(G_i)} in float64."""
    norms = {n: g.flatten(1).norm(dim=1) for n, g in psg.items()}
    total = torch.stack(list(norms.values())).square().sum(0).sqrt()
    out = {}
    ck = c / math.sqrt(len(psg))
    for n, g in psg.items():
        if clipping == "flat":
            f = (c / total).clamp(max=1.0)
        elif clipping == "per_layer":
            f = (ck / norms[n]).clamp(max=1.0)
        else:
            f = c / (total + gamma)
        f = torch.nan_to_num(f, nan=1.0, posinf=1.0)
        out[n] = torch.einsum("b,b...->...", f, g) / b_expected
    return out


def total_norms(psg: dict) -> torch.Tensor:
    return torch.stack([g.flatten(1).norm(dim=1) for g in psg.values()]).square().sum(0).sqrt()
