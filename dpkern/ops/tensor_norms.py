"""Whole-tensor passes over many tensors at once (the B = 1 clip of dpkern/engine): the fp64 sum of
squares of each, and an in-place scale that zeroes everything for a dropped sample. On the Triton
backend the fp32, contiguous, 16-byte aligned, non-empty tensors go through one launch pair (sums)
or one launch (scale) for all; the others, and the torch backend, use the reference tensor by
tensor."""
from __future__ import annotations

import torch

from dpkern import _alloc
from dpkern.backend import resolve_backend
from dpkern.reference.tensor_norms import scale_ref_, sumsq_ref

_DTYPES = (torch.float32, torch.float64)


def _check(op: str, xs) -> torch.device | None:
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"{op}: xs must be a list of tensors, got {type(xs).__name__}")
    device = None
    for k, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: xs[{k}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{op}: xs[{k}] must be float32 or float64, got {x.dtype}")
        if device is None:
            device = x.device
        elif x.device != device:
            raise ValueError(f"{op}: xs[{k}] is on {x.device}, xs[0] on {device}")
    return device


def _launchable(x: torch.Tensor) -> bool:
    from dpkern.kernels._tables import aligned
    return (x.dtype == torch.float32 and x.numel() > 0 and x.is_contiguous() and aligned(x))


def sumsq_many(xs: list, *, backend: str | None = None) -> torch.Tensor:
    """Σ x_k² of every tensor, in fp64: fp32 values are squared exactly in fp64 and summed in
    fp64, so each sum is within (n_k - 1)·2⁻⁵³ relative of the exact one (float64 tensors: each
    square rounds once more). NaN / Inf propagate.

    Args:
        xs: list of float32 / float64 tensors on one device, any shapes (empty ones sum to 0).
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").
    Returns:
        (len(xs),) float64 on their device.

    Example:
        >>> sumsq_many([torch.ones(2, 3), torch.full((4,), 0.5)])
        tensor([6., 1.], dtype=torch.float64)
    """
    op = "sumsq_many"
    device = _check(op, xs)
    if device is None:
        return torch.zeros(0, dtype=torch.float64)
    be = resolve_backend(backend, device, op=op, implemented=("triton", "torch"),
                         auto_order=("triton",))
    fast = [k for k, x in enumerate(xs) if _launchable(x)] if be == "triton" else []
    if fast:
        from dpkern.kernels.tensor_norms import sumsq_many_fwd
        part = _alloc.empty(len(fast), dtype=torch.float64, device=device)
        sumsq_many_fwd([xs[k] for k in fast], part, empty=_alloc.empty)
        if len(fast) == len(xs):
            return part
    sums = [None] * len(xs)
    for j, k in enumerate(fast):
        sums[k] = part[j]
    return torch.stack([sumsq_ref(x) if s is None else s for x, s in zip(xs, sums)])


def scale_many_(xs: list, scale: torch.Tensor, keep: torch.Tensor, *, add_to: list | None = None,
                backend: str | None = None) -> None:
    """In place: x_k ← x_k · scale_k if keep, else exact zeros (also where x_k is NaN or Inf, which
    a multiply by 0 would not give). fp32 tensors multiply by the fp32 scale (one rounding, as
    `x.mul_(scale)`); float64 ones by the scale widened to fp64. With add_to, that value is added
    to add_to[k] instead (rounded after the multiply, as `y.add_(x * scale)`) and xs are left as
    they are: one pass for a second backward's sums before the step.

    Args:
        xs: list of float32 / float64 tensors on one device.
        scale: float32 on their device, (1,) (one scale for all) or (len(xs),).
        keep: (1,) bool on their device.
        add_to: None, or a list of tensors shaped as xs (float32 / float64) on their device.
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").

    Example:
        >>> x = torch.ones(3); scale_many_([x], torch.tensor([0.5]), torch.tensor([True])); x
        tensor([0.5000, 0.5000, 0.5000])
    """
    op = "scale_many_"
    device = _check(op, xs)
    if device is None:
        return
    if not (isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and scale.dim() == 1
            and scale.shape[0] in (1, len(xs)) and scale.device == device):
        raise ValueError(f"{op}: scale must be a float32 tensor of shape (1,) or ({len(xs)},) on "
                         f"{device}, got {_describe(scale)}")
    if not (isinstance(keep, torch.Tensor) and keep.dtype == torch.bool
            and tuple(keep.shape) == (1,) and keep.device == device):
        raise ValueError(f"{op}: keep must be a (1,) bool tensor on {device}, got "
                         f"{_describe(keep)}")
    if add_to is not None:
        if _check(op + " add_to", add_to) not in (None, device) or len(add_to) != len(xs):
            raise ValueError(f"{op}: add_to must hold {len(xs)} tensors on {device}")
        for k, (x, y) in enumerate(zip(xs, add_to)):
            if y.shape != x.shape:
                raise ValueError(f"{op}: add_to[{k}] has shape {tuple(y.shape)}, xs[{k}] "
                                 f"{tuple(x.shape)}")
    be = resolve_backend(backend, device, op=op, implemented=("triton", "torch"),
                         auto_order=("triton",))
    one = scale.shape[0] == 1
    fast = ([k for k, x in enumerate(xs) if _launchable(x)
             and (add_to is None or _launchable(add_to[k]))] if be == "triton" else [])
    if fast:
        from dpkern.kernels.tensor_norms import scale_many_fwd
        scale_many_fwd([xs[k] for k in fast], scale if one or len(fast) == len(xs)
                       else torch.stack([scale[k] for k in fast]), keep,
                       None if add_to is None else [add_to[k] for k in fast])
    if len(fast) < len(xs):
        rest = set(range(len(xs))).difference(fast)
        for k in sorted(rest):
            s_k = scale[0:1] if one else scale[k:k + 1]
            if add_to is None:
                scale_ref_(xs[k], s_k, keep)
            else:
                add_to[k].add_(scale_ref_(xs[k].clone(), s_k, keep).to(add_to[k].dtype))


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__
