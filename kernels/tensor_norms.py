"""Whole-tensor passes over many fp32 tensors in one launch: the fp64 sum of squares of each
tensor, and an in-place scale with a keep flag. The B = 1 clip (dpkern/engine `_single_sample`)
runs both over every parameter's gradient: one read for the norms, one read + write for the
scaling, where a per-tensor `vector_norm(dtype=float64)` also wrote and read an fp64 copy.

Work is split into chunks of CHUNK elements; chunk c belongs to the tensor k with
starts[k] ≤ c < starts[k + 1] (counted over the table's start row). Table rows
(int64, one column per tensor): data pointers, element counts, first chunk.

Sums: every fp32 value is squared in fp64, which is exact (24-bit significands, and fp32's range
squared stays inside fp64's normal range), then summed in fp64 (a chunk's lanes, the lanes' tree,
then the chunks in order): a sum of n exact terms in any order is within (n - 1)·2⁻⁵³ relative of
the true ‖x‖² (the bound the engine takes). Fixed order: the same inputs give the same bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dpkern.kernels._tables import pointer_table

CHUNK = 32768  # elements per program (128 KB of fp32)
BLOCK = 2048  # elements per loop step
FINISH_BLOCK = 128  # chunk partials per loop step of the finishing pass


@triton.jit
def _chunk_owner(tab_ptr, n_tensors, CHUNK: tl.constexpr, L_POW2: tl.constexpr,
                 ROWS: tl.constexpr = 1):
    """(k, pointer, element count, first element) of this program's chunk: the tensor k with the
    largest start ≤ program id (starts rise strictly: every tensor has a chunk), counted over
    the whole start row in one load (L_POW2 ≥ n_tensors, a power of two). ROWS: pointer rows
    before the count and start rows."""
    pid = tl.program_id(0).to(tl.int64)
    starts = tab_ptr + (ROWS + 1) * n_tensors
    o_l = tl.arange(0, L_POW2)
    b_s = tl.load(starts + o_l, mask=o_l < n_tensors, other=pid + 1)  # [L_POW2]
    k = tl.sum((b_s <= pid).to(tl.int64), axis=0) - 1
    ptr = tl.multiple_of(tl.load(tab_ptr + k).to(tl.pointer_type(tl.float32)), 16)  # ALIGN
    numel = tl.load(tab_ptr + ROWS * n_tensors + k)
    return k, ptr, numel, (pid - tl.load(starts + k)) * CHUNK


@triton.jit
def _sumsq_chunks_kernel(tab_ptr, partial_ptr, n_tensors, CHUNK: tl.constexpr,
                         BLOCK: tl.constexpr, L_POW2: tl.constexpr):
    _, x_ptr, numel, first = _chunk_owner(tab_ptr, n_tensors, CHUNK, L_POW2)
    o = tl.arange(0, BLOCK).to(tl.int64)
    b_acc = tl.zeros([BLOCK], dtype=tl.float64)  # [BLOCK] lane sums
    if first + CHUNK <= numel:  # a whole chunk: unmasked loads, 16 bytes wide
        for start in range(0, CHUNK, BLOCK):
            b_x = tl.load(x_ptr + tl.multiple_of(first + start, BLOCK) + o).to(tl.float64)
            b_acc += b_x * b_x  # exact square, one fp64 rounding per add
    else:  # the tensor's last, partial chunk
        for start in range(0, CHUNK, BLOCK):
            o_x = first + start + o
            b_x = tl.load(x_ptr + o_x, mask=o_x < numel, other=0.0).to(tl.float64)
            b_acc += b_x * b_x
    tl.store(partial_ptr + tl.program_id(0), tl.sum(b_acc, axis=0))


@triton.jit
def _sumsq_finish_kernel(tab_ptr, partial_ptr, out_ptr, n_tensors, CHUNK: tl.constexpr,
                         BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    numel = tl.load(tab_ptr + n_tensors + k)
    first = tl.load(tab_ptr + 2 * n_tensors + k)
    count = (numel + CHUNK - 1) // CHUNK
    o = tl.arange(0, BLOCK).to(tl.int64)
    b_acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, count, BLOCK):
        b_acc += tl.load(partial_ptr + first + start + o, mask=start + o < count, other=0.0)
    tl.store(out_ptr + k, tl.sum(b_acc, axis=0))


@triton.jit
def _scale_chunks_kernel(tab_ptr, scale_ptr, stride_s, keep_ptr, n_tensors, CHUNK: tl.constexpr,
                         BLOCK: tl.constexpr, L_POW2: tl.constexpr, ACC: tl.constexpr):
    # ACC: the table's second pointer row holds accumulators: y_k += (scaled x_k), x_k untouched
    # (the launch turns fp contraction off, so the add rounds after the multiply, as torch's
    # mul then add_ do); otherwise x_k is overwritten with the scaled values.
    k, x_ptr, numel, first = _chunk_owner(tab_ptr, n_tensors, CHUNK, L_POW2, 2 if ACC else 1)
    y_ptr = x_ptr
    if ACC:
        y_ptr = tl.multiple_of(tl.load(tab_ptr + n_tensors + k).to(tl.pointer_type(tl.float32)),
                               16)  # ALIGN
    scale = tl.load(scale_ptr + k * stride_s)
    keep = tl.load(keep_ptr) != 0
    o = tl.arange(0, BLOCK).to(tl.int64)
    # a dropped sample gives exact zeros, also where x is NaN or Inf (0·NaN would be NaN)
    if first + CHUNK <= numel:  # a whole chunk: unmasked, 16 bytes wide
        for start in range(0, CHUNK, BLOCK):
            o_x = tl.multiple_of(first + start, BLOCK) + o
            b_y = tl.where(keep, tl.load(x_ptr + o_x) * scale, 0.0)
            if ACC:
                b_y = tl.load(y_ptr + o_x) + b_y
            tl.store(y_ptr + o_x, b_y)
    else:
        for start in range(0, CHUNK, BLOCK):
            o_x = first + start + o
            m_x = o_x < numel
            b_y = tl.where(keep, tl.load(x_ptr + o_x, mask=m_x, other=0.0) * scale, 0.0)
            if ACC:
                b_y = tl.load(y_ptr + o_x, mask=m_x, other=0.0) + b_y
            tl.store(y_ptr + o_x, b_y, mask=m_x)


def _table(xs: list, ys: list | None = None):
    """(device table, number of chunks, L_POW2) for fp32 tensors xs (contiguous, ALIGN-aligned,
    non-empty: the op checks), with a second pointer row for ys (same shapes) when given."""
    counts = [x.numel() for x in xs]
    starts, total = [], 0
    for n in counts:
        starts.append(total)
        total += triton.cdiv(n, CHUNK)
    tab = pointer_table([xs] if ys is None else [xs, ys], xs[0].device, int_rows=[counts, starts])
    return tab, total, triton.next_power_of_2(len(xs))


def sumsq_many_fwd(xs: list, out, empty) -> None:
    """out[k] = Σ fl64(x_k²) for fp32 tensors xs (one device; checked by the op): two launches.
    empty(n, dtype, device) allocates the chunk partials."""
    tab, chunks, l_pow2 = _table(xs)
    partial = empty(chunks, dtype=torch.float64, device=xs[0].device)
    _sumsq_chunks_kernel[(chunks,)](tab, partial, len(xs), CHUNK=CHUNK, BLOCK=BLOCK,
                                    L_POW2=l_pow2, num_warps=8)
    _sumsq_finish_kernel[(len(xs),)](tab, partial, out, len(xs), CHUNK=CHUNK, BLOCK=FINISH_BLOCK,
                                     num_warps=4)


def scale_many_fwd(xs: list, scale, keep, add_to: list | None = None) -> None:
    """x_k ← keep ? x_k · scale[k] : 0 in place, fp32 (scale (L,) or (1,) fp32, keep (1,) bool),
    or with add_to (fp32 tensors shaped as xs) add_to[k] += that value, xs untouched: one launch."""
    tab, chunks, l_pow2 = _table(xs, add_to)
    _scale_chunks_kernel[(chunks,)](tab, scale, 0 if scale.numel() == 1 else scale.stride(0),
                                    keep, len(xs), CHUNK=CHUNK, BLOCK=BLOCK, L_POW2=l_pow2,
                                    ACC=add_to is not None, num_warps=8, enable_fp_fusion=False)


__all__ = ["CHUNK", "scale_many_fwd", "sumsq_many_fwd"]
