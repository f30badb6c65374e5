"""Per-sample squared L2 norm of the rows of a (B, N) tensor, fp32 accumulation."""
from __future__ import annotations

import torch

from dpkern import _alloc
from dpkern._ext import require_cuda_ext
from dpkern.backend import resolve_backend
from dpkern.ops import _persample
from dpkern.ops._persample import (PlanCache, call_resolver, check_shared_input, groupable,
                                   layout_key, plan_key, shared_items_sig)
from dpkern.reference.rownorm import rownorm_sq_ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Matches DpkDType in csrc/include/dpkern/common.h.
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def rownorm_sq(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Squared L2 norm of each row, accumulated in fp32.

    Args:
        x: (B, N) float32 / float16 / bfloat16; any strides. B = 0 and N = 0 are allowed.
        backend: "auto" | "triton" | "cuda" | "torch" (default: DPKERN_BACKEND or "auto").
    Returns:
        (B,) float32 on x's device.

    Example:
        >>> rownorm_sq(torch.ones(2, 3))
        tensor([3., 3.])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"rownorm_sq: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"rownorm_sq: x must have rank 2 (B, N), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"rownorm_sq: x must be float32, float16 or bfloat16, got {x.dtype}")
    be = resolve_backend(backend, x.device, op="rownorm_sq")
    if be == "torch":
        return rownorm_sq_ref(x)
    n_rows, n_cols = x.shape
    out = _alloc.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return out
    if be == "triton":
        from dpkern.kernels.rownorm import rownorm_sq_fwd
        rownorm_sq_fwd(x, out)
    else:
        ext = require_cuda_ext()
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream(x.device).cuda_stream
            ext.rownorm_fwd(x.data_ptr(), out.data_ptr(), n_rows, n_cols, x.stride(0),
                            x.stride(1), _DTYPE_CODE[x.dtype], stream)
    return out


def rownorm_sq_many(xs: list, *, backend: str | None = None) -> list:
    """rownorm_sq of several (B_k, N) tensors in one launch where that gives the same numbers: the
    kernels reduce every row alone with a configuration set by N and the dtype, so tensors of one
    N, dtype and device, contiguous and 16-byte aligned (as the concatenation is), run as their
    rows concatenated. Others, and the torch backend, run one by one.

    Args:
        xs: list of (B_k, N_k) float32 / float16 / bfloat16 tensors.
        backend: as rownorm_sq.
    Returns:
        [(B_k,) float32, ...] (views of one buffer where launched together).

    Example:
        >>> rownorm_sq_many([torch.ones(2, 3), torch.ones(1, 3)])
        [tensor([3., 3.]), tensor([3.])]
    """
    if not isinstance(xs, (list, tuple)):
        raise TypeError("rownorm_sq_many: xs must be a list of tensors")
    out: list = [None] * len(xs)
    buckets: dict = {}
    resolve = call_resolver("rownorm_sq", backend, implemented=("triton", "cuda", "torch"),
                            auto_order=("triton", "cuda"), with_mode=False)
    for i, x in enumerate(xs):
        if (isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype in _FLOAT_DTYPES
                and x.is_contiguous() and x.data_ptr() % 16 == 0
                and resolve(x.device)[0] != "torch"):
            buckets.setdefault((x.shape[1], x.dtype, x.device), []).append(i)
        else:
            out[i] = rownorm_sq(x, backend=backend)
    for idx in buckets.values():
        if len(idx) == 1:
            out[idx[0]] = rownorm_sq(xs[idx[0]], backend=backend)
            continue
        rows = torch.cat([xs[i] for i in idx])
        out_rows = rownorm_sq(rows, backend=backend)
        for i, o in zip(idx, out_rows.split([xs[i].shape[0] for i in idx])):
            out[i] = o
    return out


def row_norm_dots(a: torch.Tensor, gs: list, *, backend: str | None = None) -> torch.Tensor:
    """out[k, b] = Σ_t ‖a_bt‖·‖g_kbt‖ for tensors g_k that share a (fp32 row norms and products,
    fp64 sums; the kernel's error is within the inflation that dpkern/layers/bounds.py applies).

    Args:
        a: (B, T, d) float32 / float16 / bfloat16; any strides. B, T may be 0.
        gs: non-empty list of (B, T, p_k) float tensors on a's device.
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").
    Returns:
        (len(gs), B) float64.

    Example:
        >>> row_norm_dots(torch.ones(1, 2, 4), [torch.ones(1, 2, 9)])   # 2 rows of 2·3
        tensor([[12.]], dtype=torch.float64)
    """
    op = "row_norm_dots"
    check_shared_input(op, a, gs)
    be = resolve_backend(backend, a.device, op=op, implemented=("triton", "torch"),
                         auto_order=("triton",))
    bsz, seq, _ = a.shape
    if bsz == 0 or seq == 0:
        return torch.zeros(len(gs), bsz, dtype=torch.float64, device=a.device)
    if be == "torch":
        na = torch.linalg.vector_norm(a, dim=2, dtype=torch.float32)
        return torch.stack([(na * torch.linalg.vector_norm(g, dim=2, dtype=torch.float32))
                            .sum(dim=1, dtype=torch.float64) for g in gs])
    from dpkern.kernels.row_norm_dots import row_norm_dots_fwd
    out = _alloc.empty(len(gs), bsz, dtype=torch.float64, device=a.device)
    row_norm_dots_fwd(a, list(gs), out, empty=_alloc.empty)
    return out


def row_norm_dots_grouped(items: list, *, backend: str | None = None) -> list:
    """row_norm_dots for many layers: items [(a, gs), ...] -> [(len(gs), B) fp64, ...]. Layers
    with one layout of a and of each g (in a's dtype), at most _persample.GROUP_MAX_TOKENS rows
    and 16-byte aligned tensors, share one Triton launch per three gradients; each layer's sums are those of row_norm_dots (same kernel, same blocks).

    Example:
        >>> a, g = torch.ones(1, 2, 4), torch.ones(1, 2, 9)
        >>> row_norm_dots_grouped([(a, [g]), (a, [g, g])])[1]
        tensor([[12.],
                [12.]], dtype=torch.float64)
    """
    op = "row_norm_dots_grouped"
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{op}: items must be a list of (a, gs) pairs")
    resolve = call_resolver(op, backend, with_mode=False)
    sig, devices = shared_items_sig(items)
    units = _PLANS.get(plan_key(sig, resolve, devices, _persample.GROUP_MAX_TOKENS),
                       lambda: _plan(op, items, resolve))
    out: list = [None] * len(items)
    for grouped, idx in units:
        if not grouped:
            a, gs = items[idx[0]]
            out[idx[0]] = row_norm_dots(a, gs, backend=backend)
            continue
        from dpkern.kernels.row_norm_dots import row_norm_dots_grouped_fwd
        a0, gs0 = items[idx[0]]
        res = _alloc.empty(len(idx), len(gs0), a0.shape[0], dtype=torch.float64,
                           device=a0.device)
        row_norm_dots_grouped_fwd([items[i][0] for i in idx], [list(items[i][1]) for i in idx],
                                  res, empty=_alloc.empty)
        for i, r in zip(idx, res.unbind(0)):
            out[i] = r
    return out


_PLANS = PlanCache()


def _plan(op: str, items: list, resolve) -> list:
    """row_norm_dots_grouped's plan, after checking every item: [(grouped, item indices)], one
    grouped launch per grouped entry, the others one item each."""
    units, buckets = [], {}
    for i, (a, gs) in enumerate(items):
        check_shared_input(op, a, gs)
        be = resolve(a.device)[0]
        if (be == "triton" and a.shape[0] * a.shape[1] > 0 and all(g.dtype == a.dtype for g in gs)
                and groupable(a, *gs)):
            key = (layout_key(a), tuple(layout_key(g) for g in gs))
            buckets.setdefault(key, []).append(i)
        else:
            units.append((False, [i]))
    return units + [(True, idx) for idx in buckets.values()]
