"""Launcher of the fused subspace projection (kernels/subspace_proj.py) with a torch backend."""
from __future__ import annotations

import os

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


def grouped_launches() -> bool:
    """False when DPKERN_SUBSPACE_GROUPED=0: every projected layer gets its own projection and
    back-projection launch (the per-layer path, for timing the two against each other)."""
    return os.environ.get("DPKERN_SUBSPACE_GROUPED", "1") != "0"


def _layout(a, g, u, v) -> tuple:
    """What layers projected in one launch agree on (kernels/subspace_proj.py)."""
    return tuple((tuple(x.shape), x.stride(), x.dtype) for x in (a, g, u, v))


def subspace_project_grouped(layers: list, out, *, backend: str | None = None, config=None):
    """subspace_project for many layers of one rank (RU, RV) and batch size, into one buffer, in a
    few launches: layers of one layout (same shapes, strides and dtypes of a, g, U, V: q/k/v/o,
    gate/up, ... of a transformer) are projected by ONE launch (pointer tables), and one reduce
    launch sums the split partials and writes the norms of all layers.

    Args:
        layers: [(a (B, T_k, d_k), g (B, T_k, p_k), u (p_k, RU), v (d_k, RV))], float32/16 or
            bfloat16 (float64 anywhere: the torch path, as subspace_project).
        out: (S (L, B, RU, RV), norms (L, B)) contiguous float32 (float64 for float64 inputs).
        backend, config: as subspace_project (config: for every layer; default: the heuristic at
            the group's largest T).
    Returns:
        out. out[k] equals subspace_project(*layers[k], out=...) bit for bit when every layer
        has the same T (same token split); otherwise up to the order of the split partials.

    Example:
        >>> a, g = torch.randn(2, 5, 6), torch.randn(2, 5, 4)
        >>> u, v = torch.eye(4)[:, :2], torch.eye(6)[:, :3]
        >>> s, n = torch.empty(2, 2, 2, 3), torch.empty(2, 2)
        >>> _ = subspace_project_grouped([(a, g, u, v), (2 * a, g, u, v)], (s, n))
        >>> bool((s[1] == 2 * s[0]).all())
        True
    """
    if not layers:
        raise ValueError("subspace_project_grouped: no layers")
    _check(*layers[0])
    a0, _, u0, v0 = layers[0]
    bsz, ru, rv, dev = a0.shape[0], u0.shape[1], v0.shape[1], a0.device
    by_layout: dict = {}
    f64 = False
    for k, (a, g, u, v) in enumerate(layers):
        try:
            key = _layout(a, g, u, v) + (a.device, g.device, u.device, v.device)
        except AttributeError:  # not a tensor: _check says which
            _check(a, g, u, v)
            raise
        by_layout.setdefault(key, []).append(k)
    for ks in by_layout.values():
        a, g, u, v = layers[ks[0]]
        _check(a, g, u, v)
        if a.shape[0] != bsz or u.shape[1] != ru or v.shape[1] != rv or a.device != dev:
            raise ValueError(f"subspace_project_grouped: layer {ks[0]} has B = {a.shape[0]}, "
                             f"RU = {u.shape[1]}, RV = {v.shape[1]} on {a.device}; layer 0 has "
                             f"{bsz}, {ru}, {rv} on {dev}")
        f64 = f64 or any(x.dtype == torch.float64 for x in (a, g, u, v))
    if f64 and backend == "triton":
        raise TypeError("subspace_project_grouped: backend 'triton' takes float32/16 inputs, "
                        "not float64")
    be = resolve_backend(backend, dev, op="subspace_project", implemented=("triton", "torch"),
                         auto_order=("triton",))
    acc = torch.float64 if f64 else torch.float32
    n_l = len(layers)
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(x, torch.Tensor) for x in out)):
        raise TypeError("subspace_project_grouped: out must be a pair of tensors (S, norms)")
    for name, x, want in (("S", out[0], (n_l, bsz, ru, rv)), ("norms", out[1], (n_l, bsz))):
        if (tuple(x.shape) != want or x.dtype != acc or x.device != dev
                or not x.is_contiguous()):
            raise ValueError(f"subspace_project_grouped: out {name} must be {want} {acc} "
                             f"contiguous on {dev}, got {tuple(x.shape)} {x.dtype} on {x.device}")
    s_all, n_all = out
    if be == "torch" or f64:
        for k, x in enumerate(layers):
            subspace_project(*x, backend="torch", out=(s_all[k], n_all[k]))
        return s_all, n_all
    if bsz == 0:
        return s_all, n_all
    from dpkern.kernels.subspace_proj import (aligned, subspace_proj_config,
                                              subspace_proj_partials, subspace_proj_reduce)
    cfg = config or subspace_proj_config(bsz, max(x[0].shape[1] for x in layers), dev,
                                         rank=max(ru, rv))
    part = _alloc.empty(n_l, bsz, cfg.n_split, ru * rv, dtype=torch.float32, device=dev)
    grouped = grouped_launches()
    for ks in by_layout.values():
        ok = [grouped and len(ks) > 1 and aligned(*layers[k]) for k in ks]
        table = [k for k, t in zip(ks, ok) if t]
        if len(table) > 1:
            subspace_proj_partials([layers[k] for k in table], part, cfg, rows=table)
        for k, t in zip(ks, ok):  # a layer alone in its layout, or not aligned: its own launch
            if not t or len(table) < 2:
                subspace_proj_partials([layers[k]], part[k], cfg)
    subspace_proj_reduce(part, s_all, n_all)
    return s_all, n_all
