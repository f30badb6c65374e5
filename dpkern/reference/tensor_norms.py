import torch


def sumsq_ref(x: torch.Tensor) -> torch.Tensor:
    """Σ x² of one tensor in fp64 (0-d float64): fp32 values square exactly in fp64."""
    return x.double().square().sum()


def scale_ref_(x: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x ← x · scale where keep, exact zeros where not (NaN / Inf too); in place, returns x.
    scale: one float32 value (a (1,) tensor), keep: a (1,) bool tensor."""
    return x.mul_(scale.to(x.dtype)).masked_fill_((~keep).reshape([1] * x.dim()), 0.0)
