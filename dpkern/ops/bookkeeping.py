"""Book-keeping weight gradient: the clipped sum Σ_i c_i G_i of a Linear layer in one GEMM.

With G_i = g_iᵀ a_i, Σ_i scale_i G_i = gᵀ diag(scale ⊗ 1_T) a over the flattened (B·T) rows. The
Triton kernel applies scale_i to sample i's fp32 partial product (not to the rounded g), so each
sample's contribution is scaled in fp32 whatever the input dtype: sensitivity holds in fp32.
fp32 inputs follow `_persample.fp32_mode`, which must be the mode the norms ran in: in "tf32r" (the
default on GPU) a and g are rounded to TF32 exactly as the norm kernels round them.
"""
from __future__ import annotations

import os

import torch

from dpkern import _alloc
from dpkern.backend import resolve_backend
from dpkern.ops import _persample
from dpkern.ops._persample import (FLOAT_DTYPES, PlanCache, call_resolver, check_device,
                                   check_same, check_shared_input, check_tensor,
                                   exact_fp32_matmul, fp32_mode, groupable, layout_key,
                                   layout_sig, operand, plan_key, sample_chunks)

_IMPLEMENTED = ("triton", "torch")
_fp32_mode = fp32_mode  # the parameter of the same name shadows it inside bookkeeping_wgrad
# Most bytes of T-contiguous copies of (a, g) alive at once on the fp32 path
# (DPKERN_BK_KMAJOR_BYTES; 0: never copy): a layer whose copies would exceed it copies g by column
# blocks (the lm_head at 4096 tokens: 557 MB of (a, g)); a grouped launch copies as many layers
# as fit.
KMAJOR_BYTES = int(os.environ.get("DPKERN_BK_KMAJOR_BYTES", str(512 << 20)))
# Devices whose fp32 TF32 book-keeping reads K-major copies (Hopper's TF32 wgmma wants K-major
# tiles; tests add "cpu" to run the copying path in the interpreter).
KMAJOR_DEVICES = ("cuda",)


# fp32 "tf32r": the K-major copies also round to TF32 (DPKERN_BK_PREROUND=0: plain copies, the
# kernel rounds each tile as it reads it). The sums are bit-identical either way.
PREROUND = os.environ.get("DPKERN_BK_PREROUND", "1") != "0"


def _kmajor_wanted(a: torch.Tensor, g: torch.Tensor, mode: str) -> bool:
    """fp32 with TF32 dots: Hopper's TF32 wgmma reads K-major tiles, and a (B, T, d), g (B, T, p)
    are T-strided (the reduction runs over T). Views of T-contiguous copies give the kernel K-major
    tiles and about double its rate, with bit-identical sums (H100, 8x512x2048x5632: 1.76 -> 0.90
    ms plus 0.26 ms for the copies; bench/results/tf32_probe_h100). In "tf32r" the copies hold
    round_tf32 of the values (PREROUND), so the kernel multiplies them as they are instead of
    rounding every tile it reads in registers."""
    return (a.device.type in KMAJOR_DEVICES and a.dtype == g.dtype == torch.float32
            and mode != "ieee" and a.numel() > 0 and g.numel() > 0)


def _g_columns(a: torch.Tensor, g: torch.Tensor) -> int:
    """Columns of g per K-major copy, so that a's copy and one of g's stay within KMAJOR_BYTES:
    all of them, else a multiple of 128 (the kernel's row tile), 0 when not even 128 fit (the
    kernel then reads a and g as they are)."""
    rows, p = a.shape[0] * a.shape[1], g.shape[2]
    room = KMAJOR_BYTES // 4 - a.numel()
    if room >= g.numel():
        return p
    return room // rows // 128 * 128 if room > 0 else 0


def _prerounds(mode: str) -> bool:
    """Whether the K-major copies in `mode` also round to TF32 (kmajor_tf32_copy)."""
    return mode == "tf32r" and PREROUND


def _kmajor_copy(mode: str):
    """(copy function, pre_rounded) of the fp32 path in `mode`."""
    if _prerounds(mode):
        from dpkern.kernels.bookkeeping import kmajor_tf32_copy
        return kmajor_tf32_copy, True
    return _t_contiguous, False


def _t_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.transpose(1, 2).contiguous().transpose(1, 2)


def _shared_copy(a: torch.Tensor, shared: dict | None, copy) -> torch.Tensor:
    """copy(a), or the copy held in `shared` when it was made from the same tensor data.
    shared: a one-slot cache across calls of one grouped book-keeping: layers that read the same
    input (q/k/v, gate/up) reuse the copy of a made for the first of them. It holds the source
    tensor as well, so that its storage cannot be reused while the slot matches on it."""
    if shared is None:
        return copy(a)
    key = _source_key(a, copy)
    if shared.get("key") != key:
        shared.clear()  # the previous copy goes before the next is made
        shared.update(key=key, src=a, copy=copy(a))
    return shared["copy"]


def _source_key(a: torch.Tensor, copy=None) -> tuple:
    return (a.data_ptr(), tuple(a.shape), a.stride(), a.dtype, a.device,
            getattr(copy, "__name__", None))


def _check_scale(op, scale, bsz, ref):
    if (isinstance(scale, torch.Tensor) and scale.dim() == 1 and scale.dtype == torch.float32
            and scale.shape[0] == bsz and scale.device == ref.device):
        return  # valid (the common case); the checks below name what is wrong
    check_tensor(op, "scale", scale, 1, dtypes=(torch.float32,))
    check_same(op, "batch sizes", {"scale.shape[0]": scale.shape[0], "g.shape[0]": bsz})
    check_device(op, {"g": ref, "scale": scale})


def _check_out(op, out, shape, device):
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op}: out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{op}: out must be a float tensor, got {out.dtype}")
    if out.device != device:
        raise ValueError(f"{op}: out is on {out.device}, inputs on {device}")


def _check_wgrad(op, a, g, scale, out) -> None:
    """a (B, T, d), g (B, T, p) on one device, scale (B,) fp32, out None or (p, d) float."""
    check_shared_input(op, a, [g])
    _check_scale(op, scale, a.shape[0], g)
    _check_out(op, out, (g.shape[2], a.shape[2]), a.device)


def _finish(result32: torch.Tensor, out, accumulate: bool) -> torch.Tensor:
    """Write an fp32 result into out (or return it): out = result (+ out), one rounding."""
    if out is None:
        return result32
    if accumulate:
        result32 = result32 + out.to(result32.dtype)
    out.copy_(result32)
    return out


def bookkeeping_wgrad(a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, *, out=None,
                      accumulate: bool = False, backend: str | None = None,
                      fp32_mode: str | None = None) -> torch.Tensor:
    """Σ_i scale_i g_iᵀ a_i (the clipped weight gradient of a Linear layer), fp32 accumulation.

    Args:
        a: (B, T, d) layer input; float32 / float16 / bfloat16.
        g: (B, T, p) output gradient; float32 / float16 / bfloat16.
        scale: (B,) float32 per-sample factors (clip factor, 0 for a dropped sample).
            A sample with scale 0 contributes exactly nothing, even where its a or g is not finite.
        out: optional (p, d) tensor of any float dtype (e.g. param.grad): written in place, or
            added to when accumulate=True. The sum is formed in fp32 and rounded once into out.
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").
        fp32_mode: "tf32r" | "ieee" | "tf32x3" for fp32 inputs (default: env knobs, else "tf32r" on
            CUDA, "ieee" on CPU): must be the mode the per-sample norms were computed in.
    Returns:
        out if given, else a new (p, d) float32 tensor. B = 0 gives zeros (or out unchanged when
        accumulating).

    Example:
        >>> a, g = torch.ones(2, 3, 4), torch.ones(2, 3, 5)
        >>> bookkeeping_wgrad(a, g, torch.tensor([1.0, 0.5]))[0, 0]
        tensor(4.5000)
    """
    op = "bookkeeping_wgrad"
    _check_wgrad(op, a, g, scale, out)
    mode = _fp32_mode(a.device, fp32_mode)
    be = resolve_backend(backend, a.device, op=op, implemented=_IMPLEMENTED, auto_order=("triton",))
    return _wgrad(a, g, scale, out, accumulate, be, mode)


def _wgrad(a, g, scale, out, accumulate: bool, be: str, mode: str, shared=None) -> torch.Tensor:
    """bookkeeping_wgrad after its checks, on backend `be` in fp32 mode `mode`
    (shared: _shared_copy's)."""
    bsz, seq, d = a.shape
    p = g.shape[2]
    if be == "triton" and bsz * seq > 0:
        from dpkern.kernels.bookkeeping import bookkeeping_fwd
        target = out if out is not None else _alloc.empty(p, d, dtype=torch.float32,
                                                          device=a.device)
        acc = accumulate and out is not None
        # the kernel reads scale[i] at offset i: a strided view would give it other samples' factors
        scale = scale.contiguous()
        cols = _g_columns(a, g) if _kmajor_wanted(a, g, mode) else 0
        if cols == 0:
            bookkeeping_fwd(a, g, scale, target, accumulate=acc, fp32_mode=mode)
            return target
        copy, pre = _kmajor_copy(mode)
        a_k = _shared_copy(a, shared, copy)
        for p0 in range(0, p, cols):  # one block of g's columns (rows of the result) at a time
            g_k = copy(g[:, :, p0:p0 + cols])
            bookkeeping_fwd(a_k, g_k, scale, target[p0:p0 + cols], accumulate=acc,
                            fp32_mode=mode, pre_rounded=pre)
            del g_k  # the next block's copy takes its place
        return target
    acc = torch.zeros(p, d, dtype=torch.float32, device=a.device)
    with exact_fp32_matmul(a.device):
        for sl in sample_chunks(bsz, 4 * seq * (d + p)):
            keep = scale[sl] != 0  # a dropped sample contributes nothing, even if non-finite
            g_c = operand(g[sl][keep], mode) * scale[sl][keep, None, None]
            acc.addmm_(g_c.reshape(-1, p).t(), operand(a[sl][keep], mode).reshape(-1, d))
    return _finish(acc, out, accumulate)


def _kmajor_chunks(items: list, idx: list):
    """Split a grouped fp32 unit into launches whose K-major copies (each distinct input once,
    every g) stay within KMAJOR_BYTES: yields (item indices, distinct inputs, each item's input's
    position among them) per launch, lazily, so that a consumed launch's inputs are not held."""
    part, inputs, which, pos_of, used = [], [], [], {}, 0  # pos_of: input key -> position
    for i in idx:
        a, g = items[i][0], items[i][1]
        key = _source_key(a)
        need = g.numel() + (a.numel() if key not in pos_of else 0)
        if part and (used + need) * 4 > KMAJOR_BYTES:
            yield part, inputs, which
            part, inputs, which, pos_of, used = [], [], [], {}, 0
            need = g.numel() + a.numel()
        if key not in pos_of:
            pos_of[key] = len(inputs)
            inputs.append(a)
        part.append(i)
        which.append(pos_of[key])
        used += need
    if part:
        yield part, inputs, which


def _grouped_kmajor(items: list, part: list, inputs: list, which: list, ws: list,
                    accumulate: bool, mode: str) -> None:
    """One grouped launch over rounded K-major copies: one copy launch for the distinct inputs
    (q/k/v read one), one for the gradients, then the book-keeping."""
    from dpkern.kernels.bookkeeping import bookkeeping_grouped_fwd, kmajor_tf32_copies
    a_k = kmajor_tf32_copies(inputs)
    g_k = kmajor_tf32_copies([items[i][1] for i in part])
    bookkeeping_grouped_fwd([a_k[j] for j in which], g_k,
                            [items[i][2].contiguous() for i in part], ws, accumulate,
                            fp32_mode=mode, pre_rounded=True)


def bookkeeping_wgrad_grouped(items: list, *, backend: str | None = None,
                              fp32_mode: str | None = None, consume: bool = False) -> list:
    """bookkeeping_wgrad for many layers: items [(a, g, scale, out, accumulate), ...] -> the
    results in order (each: out if given, else a new (p, d) fp32 tensor).

    Layers with one layout of a, of g (in a's dtype) and of the result, and the same accumulate
    flag, at most _persample.GROUP_MAX_TOKENS rows and 16-byte aligned tensors, share one Triton
    launch: the 16 q_proj weights of a 16-layer model are one launch, not
    16. Each layer's sum is the one bookkeeping_wgrad computes (same kernel, same tiles, its own
    scale). fp32 inputs in "tf32r" on CUDA are copied K-major (rounded) for as many layers of a
    group as fit KMAJOR_BYTES, one copy launch for their inputs and one for their gradients, then
    share one launch; other fp32 TF32 modes, the torch backend and single layers run item by
    item.
    consume=True sets each entry of `items` to None once its launch is issued, so that the
    caller's inputs can be freed group by group (the engine's flush: the memory peak stays that
    of one group's results, not of all of them).

    Example:
        >>> a, g, s = torch.ones(2, 3, 4), torch.ones(2, 3, 5), torch.tensor([1.0, 0.5])
        >>> [w[0, 0] for w in bookkeeping_wgrad_grouped([(a, g, s, None, False)] * 2)]
        [tensor(4.5000), tensor(4.5000)]
    """
    op = "bookkeeping_wgrad_grouped"
    if not isinstance(items, list):
        raise TypeError(f"{op}: items must be a list of (a, g, scale, out, accumulate)")
    resolve = call_resolver(op, backend, fp32_mode, _IMPLEMENTED)
    sig, devices = _items_sig(items)
    units = _PLANS.get(plan_key(sig, resolve, devices, _persample.GROUP_MAX_TOKENS, KMAJOR_BYTES,
                                KMAJOR_DEVICES, PREROUND),
                       lambda: _plan(op, items, resolve))
    out: list = [None] * len(items)
    shared: dict = {}  # fp32 K-major copy of the last input, for the next layer that reads it
    for key, idx in units.items():  # in order of first appearance
        if key[0] == "one":
            a, g, scale, dst, acc = items[idx[0]]
            be, mode = resolve(a.device)
            out[idx[0]] = _wgrad(a, g, scale, dst, acc, be, mode, shared)
            if consume:
                items[idx[0]] = None
            continue
        from dpkern.kernels.bookkeeping import bookkeeping_grouped_fwd
        for i in idx:
            a, g, _, dst, _ = items[i]
            out[i] = dst if dst is not None else _alloc.empty(
                g.shape[2], a.shape[2], dtype=torch.float32, device=a.device)
        a = g = None  # the launches below hold what they need; consumed inputs may then go
        for part, *inputs in _kmajor_chunks(items, idx) if key[5] else [(idx,)]:
            if key[5]:
                _grouped_kmajor(items, part, *inputs, [out[i] for i in part], key[3], key[4])
            else:
                bookkeeping_grouped_fwd([items[i][0] for i in part], [items[i][1] for i in part],
                                        [items[i][2].contiguous() for i in part],
                                        [out[i] for i in part], key[3], fp32_mode=key[4])
            if consume:  # this launch's inputs (and K-major copies) may go
                for i in part:
                    items[i] = None
            inputs = None
    return out


_PLANS = PlanCache()


def _items_sig(items: list):
    """(sig, devices) of bookkeeping_wgrad_grouped's items for its PlanCache, or (None, None)."""
    seen: dict = {}  # layers share inputs (q/k/v) and scales (flat clipping): one sig each

    def sig_of(x):
        hit = seen.get(id(x))
        if hit is None:
            hit = seen[id(x)] = layout_sig(x)
        return hit
    try:
        sig = tuple((sig_of(a), layout_sig(g), sig_of(s),
                     None if dst is None else layout_sig(dst), bool(acc))
                    for a, g, s, dst, acc in items)
        return sig, {s[0][4] for s in sig}
    except Exception:  # not a tensor, or not a 5-tuple (the plan's checks name it)
        return None, None


def _plan(op: str, items: list, resolve) -> dict:
    """bookkeeping_wgrad_grouped's plan, after checking every item: {key: item indices} in order
    of first appearance, key (a layout, g layout, result layout, accumulate, mode, K-major) for
    one grouped launch, ("one", i) for item i alone."""
    units: dict = {}
    for i, (a, g, scale, dst, acc) in enumerate(items):
        _check_wgrad(op, a, g, scale, dst)
        be, mode = resolve(a.device)
        kmajor = _kmajor_wanted(a, g, mode)
        if (be != "triton" or a.shape[0] * a.shape[1] == 0 or a.dtype != g.dtype
                or (kmajor and not (_prerounds(mode)
                                    and (a.numel() + g.numel()) * 4 <= KMAJOR_BYTES))
                or not groupable(a, g, scale, *([dst] if dst is not None else []))):
            units[("one", i)] = [i]
            continue
        res = (dst.shape, dst.stride(), dst.dtype) if dst is not None else None
        key = (layout_key(a), layout_key(g), res, bool(acc and dst is not None), mode, kmajor)
        units.setdefault(key, []).append(i)
    return units


def bookkeeping_bias(g: torch.Tensor, scale: torch.Tensor, *, out=None, accumulate: bool = False,
                     backend: str | None = None) -> torch.Tensor:
    """Σ_i scale_i Σ_t g_it (the clipped bias gradient), fp32 accumulation.

    g: (B, T, p) float, scale: (B,) float32, out: optional (p,) any float dtype -> (p,).
    A bandwidth-bound reduction: implemented with torch ops on every backend.
    """
    op = "bookkeeping_bias"
    check_tensor(op, "g", g, 3)
    _check_scale(op, scale, g.shape[0], g)
    _check_out(op, out, (g.shape[2],), g.device)
    resolve_backend(backend, g.device, op=op)  # validates the name; every backend reduces with torch
    keep = scale != 0  # a dropped sample contributes nothing, even if non-finite
    per_sample = g[keep].sum(dim=1, dtype=torch.float32)  # (B', p)
    result = (scale[keep, None] * per_sample).sum(dim=0)
    return _finish(result, out, accumulate)
