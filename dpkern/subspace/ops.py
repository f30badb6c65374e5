"""Launcher of the fused subspace projection (kernels/subspace_proj.py) with a torch backend."""
from __future__ import annotations

import torch

from dpkern import _alloc
from dpkern.backend import resolve_backend

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _check(a, g, u, v) -> None:
    for name, x, rank in (("a", a, 3), ("g", g, 3), ("u", u, 2), ("v", v, 2)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"subspace_project: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != rank:
            raise ValueError(f"subspace_project: {name} must have rank {rank}, got shape "
                             f"{tuple(x.shape)}")
        if x.dtype not in _FLOAT + (torch.float64,):
            raise TypeError(f"subspace_project: {name} must be a float tensor, got {x.dtype}")
        if x.device != a.device:
            raise ValueError(f"subspace_project: {name} is on {x.device}, a on {a.device}")
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"subspace_project: a {tuple(a.shape)} and g {tuple(g.shape)} must agree "
                         "on (B, T)")
    if u.shape[0] != g.shape[2]:
        raise ValueError(f"subspace_project: u has {u.shape[0]} rows, g has p = {g.shape[2]}")
    if v.shape[0] != a.shape[2]:
        raise ValueError(f"subspace_project: v has {v.shape[0]} rows, a has d = {a.shape[2]}")


def _check_out(out, shape, dtype, device) -> None:
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(x, torch.Tensor) for x in out)):
        raise TypeError("subspace_project: out must be a pair of tensors (S, norms)")
    for name, x, want in (("S", out[0], shape), ("norms", out[1], shape[:1])):
        if tuple(x.shape) != tuple(want) or x.dtype != dtype or x.device != device:
            raise ValueError(f"subspace_project: out {name} must be {tuple(want)} {dtype} on "
                             f"{device}, got {tuple(x.shape)} {x.dtype} on {x.device}")
        if not x.is_contiguous():
            raise ValueError(f"subspace_project: out {name} must be contiguous")


def subspace_project(a: torch.Tensor, g: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *,
                     backend: str | None = None, config=None, out=None):
    """Per-sample projected weight gradients of a Linear layer and their squared norms.

    S_i = Uᵀ G_i V = (g_i U)ᵀ (a_i V) with G_i = g_iᵀ a_i the per-sample gradient of W (p × d),
    never formed. Accumulated in fp32.

    Args:
        a: (B, T, d) layer inputs. g: (B, T, p) output gradients. u: (p, RU), v: (d, RV) bases.
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").
        config: a kernels.subspace_proj.SubspaceProjConfig (triton only; default: heuristic).
        out: optional (S, norms) to write into: (B, RU, RV) and (B,) float32 (float64 for float64
            inputs), e.g. slices of one buffer for many layers (the engine's projected layers).
    Returns:
        S (B, RU, RV) float32, norms (B,) float32 = ‖S_i‖²_F (both float64 when any input is
        float64; that case always runs the torch path, "auto" included).

    Example:
        >>> a, g = torch.randn(2, 5, 6), torch.randn(2, 5, 4)
        >>> s, n = subspace_project(a, g, torch.eye(4)[:, :2], torch.eye(6)[:, :3])
        >>> s.shape, n.shape
        (torch.Size([2, 2, 3]), torch.Size([2]))
    """
    _check(a, g, u, v)
    f64 = any(x.dtype == torch.float64 for x in (a, g, u, v))
    be = resolve_backend(backend, a.device, op="subspace_project", implemented=("triton", "torch"),
                         auto_order=("triton",))
    if f64 and backend == "triton":
        raise TypeError("subspace_project: backend 'triton' takes float32/16 inputs, not float64")
    acc = torch.float64 if f64 else torch.float32
    bsz = a.shape[0]
    ru, rv = u.shape[1], v.shape[1]
    if out is not None:
        _check_out(out, (bsz, ru, rv), acc, a.device)
    if be == "torch" or f64:
        gu = torch.matmul(g.to(acc), u.to(acc))  # (B, T, RU)
        av = torch.matmul(a.to(acc), v.to(acc))  # (B, T, RV)
        s = torch.bmm(gu.transpose(1, 2), av)
        if out is None:
            return s, s.square().sum(dim=(1, 2))
        out[0].copy_(s)
        torch.sum(s.square(), dim=(1, 2), out=out[1])
        return out[0], out[1]
    from dpkern.kernels.subspace_proj import subspace_proj_config, subspace_proj_fwd
    if out is not None:
        s, norms = out
    else:
        s = _alloc.empty(bsz, ru, rv, dtype=torch.float32, device=a.device)
        norms = _alloc.empty(bsz, dtype=torch.float32, device=a.device)
    if bsz == 0:
        return s, norms
    if ru == 0 or rv == 0:
        return s.zero_(), norms.zero_()
    cfg = config or subspace_proj_config(bsz, a.shape[1], a.device, rank=max(ru, rv))
    part = _alloc.empty(bsz, cfg.n_split, ru * rv, dtype=torch.float32, device=a.device)
    subspace_proj_fwd(a, g, u, v, part, s, norms, cfg)
    return s, norms
