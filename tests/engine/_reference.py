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


def clipped_mean(psg: dict, clipping: str, c: float, b_expected: int, gamma: float = 0.01,
                 bounds: dict | None = None) -> dict:
    """{name: (1 / B_expected) Σ_i clip(G_i)} in float64.

    bounds: {name: (B,) U_ik}, the engine's per-sample upper bounds (the clip rule of
    dpkern/layers/bounds.py): clip with them instead of the exact norms, after checking that each
    one really bounds the exact fp64 norm (check_bounds)."""
    norms = {n: g.flatten(1).norm(dim=1) for n, g in psg.items()}
    if bounds is not None:
        check_bounds(norms, bounds)
        norms = {n: bounds[n].double() for n in psg}
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


# The fp32 model's gradients differ from the fp64 reference's by fp32 rounding of the forward and
# backward; a bound must exceed the exact norm by more than that, and must not be vacuous.
BOUND_FP32_SLACK = 1e-5
BOUND_MAX_LOOSENESS = 0.05


def check_bounds(norms: dict, bounds: dict) -> None:
    """Every bound U_ik ≥ the exact fp64 per-sample norm (up to the fp32-vs-fp64 model difference)
    and not looser than BOUND_MAX_LOOSENESS relative (plus 1e-4 of the largest total norm, for
    parameters whose exact gradient is ~0 and whose fp32 one is rounding noise)."""
    assert bounds.keys() == norms.keys()
    total = float(torch.stack(list(norms.values())).square().sum(0).sqrt().max())
    for n, exact in norms.items():
        u = bounds[n].double().cpu()
        floor = 1e-4 * total  # parameters whose exact gradient is ~0 (e.g. attention key biases)
        assert (u >= exact * (1 - BOUND_FP32_SLACK)).all(), (n, u, exact)
        assert (u <= exact * (1 + BOUND_MAX_LOOSENESS) + floor).all(), (n, u, exact)


def total_bounds(last_clip: dict) -> torch.Tensor:
    """(B,) float64 flat bound sqrt(Σ_k U_ik²) from DPOptimizer.last_clip."""
    return torch.stack([u.double().cpu() for _, u in last_clip.values()]).square().sum(0).sqrt()


def total_norms(psg: dict) -> torch.Tensor:
    return torch.stack([g.flatten(1).norm(dim=1) for g in psg.values()]).square().sum(0).sqrt()
