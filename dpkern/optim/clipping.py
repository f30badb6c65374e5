"""Clip factors from per-sample squared norms.

* "flat":      c_i = min(1, C / ‖G_i‖), ‖G_i‖ over all private parameters.
* "per_layer": c_ik = min(1, C_k / ‖G_ik‖) for each parameter k, with Σ_k C_k² = C² (a float C is
               split evenly, C_k = C / √K; a list gives the C_k and C = ‖(C_k)‖).
* "automatic": c_i = C / (‖G_i‖ + γ) (Bu et al., automatic clipping): every sample's contribution
               has norm < C, and the update direction no longer depends on a tuned threshold.

Norms are fp32 (or wider). The denominator is inflated by 1e-6 relative so that rounding in the norm
can never let a clipped contribution exceed C. A sample whose squared norm is not finite gets
c_i = 0 (it is dropped and counted, never propagated).
"""
from __future__ import annotations

import math

import torch

CLIPPING_MODES = ("flat", "per_layer", "automatic")
_SAFETY = 1.0 + 1e-6


def check_clipping(clipping: str, max_grad_norm, n_params: int) -> tuple[float, list[float] | None]:
    """Validate; returns (total C, per-parameter C_k for "per_layer" else None)."""
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}")
    if isinstance(max_grad_norm, (list, tuple)):
        if clipping != "per_layer":
            raise ValueError("max_grad_norm: a list of thresholds needs clipping='per_layer'")
        if len(max_grad_norm) != n_params:
            raise ValueError(f"max_grad_norm: got {len(max_grad_norm)} thresholds for {n_params} "
                             "private parameters (one per parameter, in model order)")
        ks = [float(c) for c in max_grad_norm]
        if not all(math.isfinite(c) and c > 0 for c in ks):
            raise ValueError(f"max_grad_norm: every threshold must be finite and > 0, got {ks}")
        return math.sqrt(sum(c * c for c in ks)), ks
    c = float(max_grad_norm)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm!r}")
    if clipping == "per_layer":
        return c, [c / math.sqrt(max(n_params, 1))] * n_params
    return c, None


def clip_factors(norms_sq: list, clipping: str, max_grad_norm: float,
                 per_param: list | None = None, gamma: float = 0.01):
    """Per-sample factors from squared norms.

    Args:
        norms_sq: list over parameters of (B,) float32 squared norms of the true per-sample grads.
        per_param: C_k for each entry of norms_sq (per_layer only).
    Returns:
        (factors, finite): factors is a list of (B,) float32 (one per parameter; the same tensor
        for all in flat / automatic mode), finite a (B,) bool mask of the samples kept.
    """
    total = torch.stack(norms_sq).sum(dim=0)
    finite = torch.isfinite(total)
    if clipping == "per_layer":
        out = []
        for n2, ck in zip(norms_sq, per_param):
            n = n2.sqrt() * _SAFETY
            out.append(torch.where(finite & (n > ck), ck / n, finite.to(n.dtype)))
        return out, finite
    n = total.sqrt()
    if clipping == "flat":
        n = n * _SAFETY
        c = torch.where(finite & (n > max_grad_norm), max_grad_norm / n, finite.to(n.dtype))
    else:
        c = torch.where(finite, max_grad_norm / (n + gamma), torch.zeros_like(n))
    return [c] * len(norms_sq), finite
