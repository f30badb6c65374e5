"""Launch one kernel over L layers of one layout: the layers' tensors travel as tables of data
pointers (int64, one row per operand, one column per layer), which a kernel reads with
`layer_ptr`. Layers of one launch agree on shapes, strides and dtypes
(dpkern.ops._persample.layout_key). The tensors stay with the caller, which keeps them alive
until the launch is on the stream (the caching allocator then orders any reuse after it)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}


# The kernels are told that every tabled pointer is a multiple of this many bytes (as Triton
# assumes of a 16-byte aligned pointer argument): without it their loads are not vectorised.
ALIGN = 16
_TABLES: dict = {}  # pointer values -> device table: the same layers' table is uploaded once
_TABLES_MAX = 256


def aligned(*xs: torch.Tensor) -> bool:
    """Whether every tensor starts on an ALIGN-byte boundary (may go in a pointer table)."""
    return all(x.data_ptr() % ALIGN == 0 for x in xs)


def pointer_table(rows: list, device: torch.device, ints: list | None = None,
                  int_rows: list | None = None) -> torch.Tensor:
    """rows: R lists of L tensors -> (R (+1) (+I), L) int64 on `device`: their data pointers, then,
    when given, one row of plain integers `ints` (L of them), then the I rows `int_rows`. Every
    pointer must be ALIGN-aligned (the ops send other tensors through single-layer launches).
    Cached by value (weights', states' and often activations' tables are the same every step): no
    upload on a hit, and on a miss a pinned, non-blocking one (no host-GPU synchronisation). A
    table holds addresses only, so a hit is right whatever tensors now live there."""
    vals = [tuple(x.data_ptr() for x in row) for row in rows]
    if any(v % ALIGN for row in vals for v in row):
        raise ValueError(f"pointer_table: every tensor must start on a {ALIGN}-byte boundary")
    if ints is not None:
        vals.append(tuple(int(i) for i in ints))
    for row in int_rows or ():
        vals.append(tuple(int(i) for i in row))
    key = (tuple(vals), str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    host = torch.tensor(vals, dtype=torch.int64)
    tab = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    if len(_TABLES) >= _TABLES_MAX:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = tab
    return tab


def shared_input_args(as_: list, gss: list, max_g: int):
    """Operand arguments of a kernel that reads, per layer, one input a (B, T, d) and up to max_g
    gradients g_k (B, T, p_k) sharing it: yields (ks, args) per launch, ks the gradient positions
    it covers, args a_ptr, g{j}_ptr (the tensors for one layer, rows of one pointer table for
    several), seq, d, batch, p{j} and the strides (an unused slot repeats the launch's first
    gradient)."""
    a, gs = as_[0], gss[0]
    tab = (pointer_table([as_] + [[g[k] for g in gss] for k in range(len(gs))], a.device)
           if len(as_) > 1 else None)
    for start in range(0, len(gs), max_g):
        ks = list(range(start, min(start + max_g, len(gs))))
        args = dict(a_ptr=a if tab is None else tab[0], seq=a.shape[1], d=a.shape[2],
                    batch=a.shape[0], stride_ab=a.stride(0), stride_at=a.stride(1),
                    stride_ad=a.stride(2))
        for j, k in enumerate(ks + [ks[0]] * (max_g - len(ks))):
            g = gs[k]
            args.update({f"g{j}_ptr": g if tab is None else tab[1 + k], f"p{j}": g.shape[2],
                         f"stride_g{j}b": g.stride(0), f"stride_g{j}t": g.stride(1),
                         f"stride_g{j}p": g.stride(2)})
        yield ks, args


@triton.jit
def layer_ptr(x, i_l, TABLE: tl.constexpr, ELT: tl.constexpr):
    """x itself (one layer), or with TABLE the pointer to ELT held in entry i_l of table x."""
    if TABLE:
        # The hint goes on the pointer itself: Triton's alignment analysis does not carry a hint
        # on the int64 through the int-to-pointer cast, and without it every load is scalar.
        x = tl.multiple_of(tl.load(x + i_l).to(tl.pointer_type(ELT)), 16)  # ALIGN
    return x
