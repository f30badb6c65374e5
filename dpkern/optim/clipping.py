"""Clip factors from per-sample squared norms.

* "flat":      c_i = min(1, C / ‖G_i‖), ‖G_i‖ over all private parameters.
* "per_layer": c_ik = min(1, C_k / ‖G_ik‖) for each parameter k, with Σ_k C_k² = C² (a float C is
               split evenly, C_k = C / √K; a list gives the C_k and C = ‖(C_k)‖).
* "automatic": c_i = C / (‖G_i‖ + γ) (Bu et al., automatic clipping): every sample's contribution
               has norm < C, and the update direction no longer depends on a tuned threshold.

Each sample's norm enters as an upper bound U_i ≥ the norm of its *released* contribution
(dpkern/layers/bounds.py: covers the fp32 error of the norm kernels and of the book-keeping, for
any inputs); factors are formed in fp64 and rounded *down* to fp32, so c_i U_i ≤ C holds for the
fp32 factor the book-keeping uses. A sample whose bound is not finite gets c_i = 0 (it is dropped
and counted, never propagated).
"""
from __future__ import annotations

import math

import torch

CLIPPING_MODES = ("flat", "per_layer", "automatic")


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


def round_down_f32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the largest float32 ≤ x (x ≥ 0): a clip factor must never round up."""
    y = x.float()
    return torch.where(y.double() > x, torch.nextafter(y, torch.zeros_like(y)), y)


def clip_factors(bounds: list, clipping: str, max_grad_norm: float,
                 per_param: list | None = None, gamma: float = 0.01):
    """Per-sample factors from per-parameter upper bounds on the per-sample norms.

    Args:
        bounds: list over parameters of (B,) float64 U_ik ≥ ‖released contribution of sample i to
            parameter k‖ (already scaled to the true per-sample gradient), or their (K, B) stack
            (release_bound_matrix).
        per_param: C_k for each entry of bounds (per_layer only).
    Returns:
        (factors, finite): factors is a list of (B,) float64 (one per parameter; the same tensor
        for all in flat / automatic mode), finite a (B,) bool mask of the samples kept.
        Round them down to fp32 (round_down_f32) after any further scaling.
    """
    if isinstance(bounds, torch.Tensor):
        u2 = bounds.double().square()
    else:
        u2 = torch.stack([b.double() for b in bounds]).square()
    # fp64 sum of K squares: relative error ≤ K·2^-53; covered by the (1 + K·2^-52) factor.
    total = u2.sum(dim=0).sqrt() * (1.0 + len(bounds) * 2.0 ** -52)
    finite = torch.isfinite(total)
    if clipping == "per_layer":
        out = []
        for b, ck in zip(bounds, per_param):
            out.append(torch.where(finite & (b > ck), ck / b, finite.double()))
        return out, finite
    if clipping == "flat":
        c = torch.where(finite & (total > max_grad_norm), max_grad_norm / total, finite.double())
    else:
        c = torch.where(finite, max_grad_norm / (total + gamma), torch.zeros_like(total))
    return [c] * len(bounds), finite
