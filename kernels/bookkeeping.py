"""Book-keeping weight gradient W = Σ_i scale_i g_iᵀ a_i (p × d): one GEMM over the B·T tokens.

Each program owns a [BP, BD] tile of W. For every sample i it accumulates g_iᵀ a_i over the sample's
tokens into an fp32 tile with the inputs in their own dtype (16-bit products are exact in fp32), then
adds scale_i times that tile to the running sum. The scale is thus applied in fp32 to the exact
per-sample partial, never to a rounded g: each sample's contribution is scaled in fp32 whatever the
training dtype. The result is written (or added, in fp32, then rounded once) into W in its dtype.
Tiles are visited in grouped order so that neighbouring programs reuse g and a columns from L2.
16-bit inputs on Hopper whose (B·T, n) rows are contiguous and T a multiple of the token step read
their tiles by TMA descriptors built in the kernel (TMA=True; H100, the 1B shapes, timed from
CUDA-graph replays: 82-85% of torch.matmul at 8x512, 75-81% at 16x256; by pointers 49-55% /
43-49%; bench/results/gpu_h100_s17/README.md, gpu_h100_s13/README.md).
fp32 inputs: in "tf32r" mode (default on GPU) the operands are rounded to TF32 by the same function
as in the norm kernels (ghost_norm._round_tf32) and multiplied in TF32 (exact products), so each
sample's partial is the sum of exactly the products whose norm the engine clipped.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dpkern.kernels._tables import TL_DTYPE, layer_ptr, pointer_table
from dpkern.kernels.ghost_norm import _round_tf32, dot_precision, resolve_mode, rounds


@dataclass(frozen=True)
class BookkeepingConfig:
    BLOCK_P: int
    BLOCK_D: int
    BLOCK_T: int
    GROUP_P: int
    num_warps: int
    num_stages: int
    # fp32 mode (ghost_norm.KERNEL_MODES); None: the launch's (dpkern.ops resolves one mode for
    # the norms and the book-keeping, so the two always see the same operands)
    fp32_dot: str | None = None
    # tiles by TMA descriptors (tma_ok); None: wherever the launch allows it
    tma: bool | None = None


def bookkeeping_config(seq: int, d: int, p: int, bits16: bool = False,
                       tma: bool = False) -> BookkeepingConfig:
    """Heuristic: 128 × 128 tiles (64 × 64 for narrow layers); token step ≤ the sequence length.
    bits16: 16-bit operands, whose 128 × 128 tiles take a token step of 128 from T = 128 (H100, the
    1B model's shapes at 8x512 and 16x256: 13-16% faster than 64); fp32 tiles of that size would
    not fit shared memory three stages deep. tma: 16-bit tiles read by TMA (tma_ok), which run
    fastest as 128 × 256 tiles with a token step of 64 (H100: 70-80% of torch.matmul against
    64-68% with 128 × 128 × 128; bench/results/gpu_h100_s13/08ea297)."""
    block_t = 64 if seq >= 64 else max(16, triton.next_power_of_2(seq))
    if min(d, p) >= 512:
        if bits16 and tma and seq % 64 == 0:
            return BookkeepingConfig(128, 256, 64, 8, 8, 3)
        return BookkeepingConfig(128, 128, 128 if bits16 and seq >= 128 else block_t, 8, 8, 3)
    return BookkeepingConfig(64, 64, block_t, 8, 4, 3)


def bookkeeping_search_space():
    """Enumerable configs for autotuning sweeps in bench/."""
    return [BookkeepingConfig(bp, bd, bt, 8, w, s) for bp, bd in ((128, 128), (128, 256), (64, 128))
            for bt in (32, 64) for w in (4, 8) for s in (3, 4)]


@triton.jit
def grouped_tile(pid, p, d, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_P: tl.constexpr):
    """Program pid's (row, column) tile of the (p, d) result in grouped order: GROUP_P row tiles
    sweep the column tiles together, so neighbouring programs reuse g and a columns from L2."""
    n_p = tl.cdiv(p, BLOCK_P)
    n_d = tl.cdiv(d, BLOCK_D)
    per_group = GROUP_P * n_d
    first_p = (pid // per_group) * GROUP_P
    group_size = tl.minimum(n_p - first_p, GROUP_P)
    return first_p + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _bookkeeping_fwd_kernel(a_ptr, g_ptr, scale_ptr, w_ptr, batch, seq, d, p,
                            stride_ab, stride_at, stride_ad,
                            stride_gb, stride_gt, stride_gp,
                            stride_wp, stride_wd,
                            ACCUMULATE: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_P: tl.constexpr,
                            UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ROUND: tl.constexpr,
                            TABLE: tl.constexpr, ELT: tl.constexpr, W_ELT: tl.constexpr,
                            TMA: tl.constexpr):
    # TABLE: a, g, scale and w are pointer tables over layers (kernels/_tables.py), axis 1 the layer
    # TMA: a and g are row-major (B·T, n) with T a multiple of BLOCK_T (tma_ok): each token tile
    # comes by a tensor-memory-access descriptor (columns past d / p read as zeros), not by
    # per-thread copies; the product and the per-sample scaling are the same.
    i_l = tl.program_id(1).to(tl.int64)
    a_ptr = layer_ptr(a_ptr, i_l, TABLE, ELT)
    g_ptr = layer_ptr(g_ptr, i_l, TABLE, ELT)
    if TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[batch * seq, d], strides=[stride_at, 1],
                                           block_shape=[BLOCK_T, BLOCK_D])
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[batch * seq, p], strides=[stride_gt, 1],
                                           block_shape=[BLOCK_T, BLOCK_P])
    scale_ptr = layer_ptr(scale_ptr, i_l, TABLE, tl.float32)
    w_ptr = layer_ptr(w_ptr, i_l, TABLE, W_ELT)
    i_p, i_d = grouped_tile(tl.program_id(0), p, d, BLOCK_P, BLOCK_D, GROUP_P)
    o_p = (i_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    o_d = (i_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    o_t = tl.arange(0, BLOCK_T)
    m_p = o_p < p
    m_d = o_d < d
    b_w = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)  # [BP, BD] running Σ_i scale_i G_i
    b_gi = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)  # [BP, BD] sample i's G_i tile
    # One flat loop over (sample, token tile): the compiler pipelines it across sample boundaries,
    # where a loop per sample drained the pipeline every sample (short sequences: T = 128 is two
    # token tiles per sample). Each sample's partial is still summed alone, in the same order.
    n_tt = tl.cdiv(seq, BLOCK_T)
    for k in range(0, batch * n_tt):
        i = k // n_tt
        j = k - i * n_tt
        i64 = tl.cast(i, tl.int64)
        if TMA:  # row k·BT of the (B·T, n) view is token j·BT of sample i
            b_g = g_desc.load([k * BLOCK_T, i_p * BLOCK_P]).T  # [BP, BT]
            b_a = a_desc.load([k * BLOCK_T, i_d * BLOCK_D])  # [BT, BD]
        else:
            o_tt = (j * BLOCK_T + o_t).to(tl.int64)
            m_t = o_tt < seq
            b_g = tl.load(g_ptr + i64 * stride_gb + o_p[:, None] * stride_gp
                          + o_tt[None, :] * stride_gt,
                          mask=m_p[:, None] & m_t[None, :], other=0.0)  # [BP, BT]
            b_a = tl.load(a_ptr + i64 * stride_ab + o_tt[:, None] * stride_at
                          + o_d[None, :] * stride_ad,
                          mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
        if UPCAST:
            b_g = b_g.to(tl.float32)
            b_a = b_a.to(tl.float32)
        if ROUND:  # the same TF32 operands as the norm kernels
            b_g = _round_tf32(b_g.to(tl.float32))
            b_a = _round_tf32(b_a.to(tl.float32))
        b_gi = tl.dot(b_g, b_a, b_gi, input_precision=DOT_PREC)
        if j == n_tt - 1:  # sample i's last token tile: scale its partial, start the next one
            # a dropped sample (scale 0) contributes exactly nothing, even with non-finite grads.
            # A fused multiply-add and a select per element: the boundary's arithmetic keeps the
            # tensor cores idle, and against a multiply, a select and an add this form took the
            # 128 x 256 TMA kernel from 71-82% to 77-86% of torch.matmul (H100, the 1B shapes;
            # a branch on the scale instead was 5x slower: bench/results/gpu_h100_s17). The sum
            # rounds once where the multiply and the add rounded twice (same error bound).
            scale_i = tl.load(scale_ptr + i)
            b_w = tl.where(scale_i != 0.0, tl.fma(b_gi, scale_i, b_w), b_w)
            b_gi = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    p_w = w_ptr + o_p[:, None] * stride_wp + o_d[None, :] * stride_wd
    m_w = m_p[:, None] & m_d[None, :]
    if ACCUMULATE:
        b_w += tl.load(p_w, mask=m_w, other=0.0).to(tl.float32)
    tl.store(p_w, b_w.to(w_ptr.dtype.element_ty), mask=m_w)


def bookkeeping_fwd(a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, w: torch.Tensor,
                    accumulate: bool, config: BookkeepingConfig | None = None,
                    fp32_mode: str | None = None, pre_rounded: bool = False) -> None:
    """a (B, T, d), g (B, T, p), scale (B,) fp32 -> w (p, d) = Σ scale_i g_iᵀ a_i (+ w if
    accumulate), in w's dtype. Caller validates; B·T > 0.
    fp32_mode: "tf32r" | "ieee" | "tf32x3" (default: the config's, else tf32r on CUDA).
    pre_rounded: a and g already hold TF32 values (kmajor_tf32_copy): "tf32r" then skips its
    in-kernel rounding, which is the identity on them, so the sum is bit for bit the same."""
    _launch([a], [g], [scale], [w], accumulate, config, fp32_mode, pre_rounded)


def bookkeeping_grouped_fwd(as_: list, gs: list, scales: list, ws: list, accumulate: bool,
                            config: BookkeepingConfig | None = None,
                            fp32_mode: str | None = None, pre_rounded: bool = False) -> None:
    """L layers in one launch: ws[l] = Σ scales[l]_i gs[l]_iᵀ as_[l]_i (+ ws[l]). All as_ share
    one layout (kernels/_tables.py), as do all gs (in a's dtype), all ws and all scales (B,) fp32.
    Caller validates; B·T > 0. pre_rounded: as bookkeeping_fwd's (kmajor_tf32_copies)."""
    _launch(as_, gs, scales, ws, accumulate, config, fp32_mode, pre_rounded)


def tma_ok(as_: list, gs: list, cfg: BookkeepingConfig) -> bool:
    """Whether the launch may read its tiles by TMA descriptors: cfg.tma not False; 16-bit a and
    g of one dtype, each a row-major (B·T, n) matrix (unit last stride, samples back to back)
    with 16-byte aligned start and rows; T a multiple of the token step (a tile never spans two
    samples). With cfg.tma None (auto) also a CUDA device of compute capability ≥ 9 (Hopper's
    tensor memory accelerator); True asks for it on any device (the CPU interpreter in tests)."""
    a, g = as_[0], gs[0]
    bsz, seq, _ = a.shape
    if cfg.tma is False or a.dtype != g.dtype or a.element_size() != 2 or seq % cfg.BLOCK_T:
        return False
    if cfg.tma is None and not (a.is_cuda and _has_tma(a.device.index)):
        return False
    for x in (a, g):
        if x.stride(2) != 1 or (bsz > 1 and x.stride(0) != seq * x.stride(1)):
            return False
        if (x.stride(1) * x.element_size()) % 16:
            return False
    return all(x.data_ptr() % 16 == 0 for x in (*as_, *gs))


@functools.lru_cache(maxsize=None)
def _has_tma(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the descriptors a TMA launch builds on the device (triton allocator)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def _tma_scratch(on_cuda: bool):
    """Give the launch an allocator for its descriptors unless the caller has set one. Triton
    keeps the allocator in a context variable, which a new thread (the autograd engine's) starts
    without, so it is set around the launch and then restored."""
    from triton.runtime import _allocation
    var = getattr(_allocation, "_allocator", None)
    if on_cuda and var is None:  # a Triton without the context variable: its public setter
        triton.set_allocator(_scratch)
    if not on_cuda or var is None or not isinstance(var.get(), _allocation.NullAllocator):
        yield
        return
    token = var.set(_scratch)
    try:
        yield
    finally:
        var.reset(token)


def _auto_config(as_: list, gs: list) -> tuple[BookkeepingConfig, bool]:
    """(the heuristic config, whether it reads by TMA): its TMA form where the launch can read its
    tiles by TMA. When that form cannot, neither can the pointer form: it differs only for wide
    16-bit layers with T a multiple of 64, where what failed is the layout, not the token step."""
    bsz, seq, d = as_[0].shape
    p = gs[0].shape[2]
    bits16 = as_[0].element_size() == 2
    if bits16:
        cfg = bookkeeping_config(seq, d, p, bits16, tma=True)
        if tma_ok(as_, gs, cfg):
            return cfg, True
    return bookkeeping_config(seq, d, p, bits16), False


def _launch(as_, gs, scales, ws, accumulate, config, fp32_mode, pre_rounded=False) -> None:
    a, g, w = as_[0], gs[0], ws[0]
    n_layers = len(as_)
    table = n_layers > 1
    bsz, seq, d = a.shape
    p = g.shape[2]
    cfg, tma = (config, tma_ok(as_, gs, config)) if config else _auto_config(as_, gs)
    mode = resolve_mode(fp32_mode, cfg.fp32_dot, a.device)
    tab = pointer_table([as_, gs, scales, ws], a.device) if table else None
    grid = (triton.cdiv(p, cfg.BLOCK_P) * triton.cdiv(d, cfg.BLOCK_D), n_layers)
    with _tma_scratch(tma and a.is_cuda):
        _bookkeeping_fwd_kernel[grid](
            a_ptr=tab[0] if table else a, g_ptr=tab[1] if table else g,
            scale_ptr=tab[2] if table else scales[0], w_ptr=tab[3] if table else w,
            batch=bsz, seq=seq, d=d, p=p,
            stride_ab=a.stride(0), stride_at=a.stride(1), stride_ad=a.stride(2),
            stride_gb=g.stride(0), stride_gt=g.stride(1), stride_gp=g.stride(2),
            stride_wp=w.stride(0), stride_wd=w.stride(1),
            ACCUMULATE=accumulate, BLOCK_P=cfg.BLOCK_P, BLOCK_D=cfg.BLOCK_D, BLOCK_T=cfg.BLOCK_T,
            GROUP_P=cfg.GROUP_P, UPCAST=a.device.type != "cuda" or a.dtype != g.dtype,
            DOT_PREC=dot_precision(mode, a, g), ROUND=rounds(mode, a, g) and not pre_rounded,
            TABLE=table, ELT=TL_DTYPE[a.dtype], W_ELT=TL_DTYPE[w.dtype], TMA=tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@triton.jit
def _kmajor_tf32_kernel(x_ptr, y_ptr, seq, n, stride_xb, stride_xt, stride_xn, slot,
                        TABLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[l, b, j, t] = round_tf32(x_l[b, t, j]): one [BT, BN] tile of sample b of tensor l, read
    along n, written along t. TABLE: x is a pointer table over L tensors of one layout (y holds
    them `slot` elements apart); else one tensor."""
    n_tt = tl.cdiv(seq, BLOCK_T)
    i_t = tl.program_id(0) % n_tt
    i_n = tl.program_id(0) // n_tt
    i_b = tl.program_id(1).to(tl.int64)
    i_l = tl.program_id(2).to(tl.int64)
    x_ptr = layer_ptr(x_ptr, i_l, TABLE, tl.float32)
    o_t = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m = (o_t < seq)[:, None] & (o_n < n)[None, :]
    b_x = tl.load(x_ptr + i_b * stride_xb + o_t[:, None] * stride_xt + o_n[None, :] * stride_xn,
                  mask=m, other=0.0)
    y_ptr += i_l * slot + i_b * seq * n
    tl.store(y_ptr + o_n[None, :] * seq + o_t[:, None], _round_tf32(b_x), mask=m)


# K-major copies of one grouped launch sit this many elements apart at least (128 bytes), so that
# each copy starts aligned as the pointer tables require (kernels/_tables.ALIGN)
_SLOT_ALIGN = 32


def kmajor_slot(x: torch.Tensor) -> int:
    """Elements one K-major copy of x (B, T, n) takes in a buffer of kmajor_tf32_copies."""
    return -(-x.numel() // _SLOT_ALIGN) * _SLOT_ALIGN


def _kmajor_launch(xs: list, y: torch.Tensor, slot: int) -> None:
    x = xs[0]
    bsz, seq, n = x.shape
    if x.numel() == 0:
        return
    table = len(xs) > 1
    grid = (triton.cdiv(seq, 64) * triton.cdiv(n, 64), bsz, len(xs))
    _kmajor_tf32_kernel[grid](pointer_table([xs], x.device) if table else x, y, seq, n,
                              x.stride(0), x.stride(1), x.stride(2), slot, TABLE=table,
                              BLOCK_T=64, BLOCK_N=64, num_warps=4)


def kmajor_tf32_copy(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, n) fp32 -> a (B, T, n) view of a T-contiguous copy (strides (T·n, 1, T)) holding
    round_tf32(x) (dpkern.ops._persample.round_tf32, bit for bit): the K-major TF32 operand of the
    fp32 book-keeping, rounded once in memory instead of in every program that reads the tile.
    out: optional contiguous (B, n, T) fp32 storage to write (tests poison it)."""
    bsz, seq, n = x.shape
    y = out if out is not None else torch.empty(bsz, n, seq, dtype=torch.float32, device=x.device)
    assert y.shape == (bsz, n, seq) and y.is_contiguous() and y.dtype == torch.float32
    _kmajor_launch([x], y, 0)
    return y.transpose(1, 2)


def kmajor_tf32_copies(xs: list, out: torch.Tensor | None = None) -> list:
    """kmajor_tf32_copy of L fp32 tensors of one layout (shape and strides, 16-byte aligned) in one
    launch, into one buffer: copy l starts at element l·kmajor_slot(xs[0]) (128-byte aligned).
    out: optional contiguous fp32 buffer of L·kmajor_slot elements (tests poison it)."""
    x = xs[0]
    bsz, seq, n = x.shape
    slot = kmajor_slot(x)
    y = out if out is not None else torch.empty(len(xs) * slot, dtype=torch.float32,
                                                device=x.device)
    assert y.numel() == len(xs) * slot and y.is_contiguous() and y.dtype == torch.float32
    _kmajor_launch(xs, y, slot)
    shape, strides = (bsz, seq, n), (seq * n, 1, seq)  # one op per view: the views are host time
    return [y.as_strided(shape, strides, y.storage_offset() + i * slot) for i in range(len(xs))]
