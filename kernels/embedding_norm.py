"""Embedding per-sample norms and the tied embedding / lm_head cross term, as masked Gram planes.

embedding: ‖E_i‖² = Σ_{t,s} [id_t = id_s ≠ pad] ⟨g_t, g_s⟩. One program per upper-triangle (t, s)
  tile pair of one sample (the plane is symmetric: off-diagonal pairs weigh 2); the [BT, BT] Gram
  tile of g is built on chip, masked by token equality and reduced to one fp32 partial.
tied:      ⟨E_i, H_i⟩ = Σ_{s,t} g_head[s, id_t] ⟨a_head_s, g_emb_t⟩ (pad t excluded). One program per
  (s, t) tile pair (not symmetric); the logit gradients are gathered at the token ids of the t-tile.
Partials are summed in fp64 on the host side: deterministic, no atomics. No V × d tensor is ever formed.

Precision for fp32 inputs: the embedding's clipped gradient is book-kept by an fp32 index_add of the
unrounded g, so g is never rounded here: in "tf32r" mode the Grams of g run in IEEE fp32. The lm_head
side of the tied cross term (a_head, g_head) is book-kept by the linear book-keeping kernel, so in
"tf32r" mode those operands are rounded to TF32 exactly as that kernel rounds them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dpkern.kernels.ghost_norm import (_gram_tile, _round_tf32, dot_precision, resolve_mode,
                                       rounds, tile_pairs)


@dataclass(frozen=True)
class EmbeddingNormConfig:
    BLOCK_T: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    fp32_dot: str | None = None  # fp32 mode (ghost_norm.KERNEL_MODES); None: the launch's


def embedding_norm_config(seq: int) -> EmbeddingNormConfig:
    if seq >= 1024:
        return EmbeddingNormConfig(BLOCK_T=128, BLOCK_K=32, num_warps=8, num_stages=3)
    return EmbeddingNormConfig(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3)


def _unrounded(mode: str) -> str:
    """Dot precision for operands that are never rounded (the embedding's g): ieee under tf32r."""
    return "ieee" if mode == "tf32r" else mode


def embedding_norm_search_space():
    """Enumerable configs for autotuning sweeps in bench/."""
    return [EmbeddingNormConfig(bt, bk, w, s) for bt in (64, 128) for bk in (32, 64)
            for w in (4, 8) for s in (2, 3)]


@triton.jit
def _embedding_norm_fwd_kernel(ids_ptr, g_ptr, pairs_ptr, part_ptr, seq, d, n_pairs, pad,
                               stride_ib, stride_it, stride_gb, stride_gt, stride_gd,
                               HAS_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                               DOT_PREC: tl.constexpr):
    i_pair = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    i_t = tl.load(pairs_ptr + 2 * i_pair)
    i_s = tl.load(pairs_ptr + 2 * i_pair + 1)
    weight = tl.where(i_t == i_s, 1.0, 2.0)
    o_t = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    o_s = (i_s * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    m_t = o_t < seq
    m_s = o_s < seq
    b_id_t = tl.load(ids_ptr + i_b * stride_ib + o_t * stride_it, mask=m_t, other=-1)  # [BT]
    b_id_s = tl.load(ids_ptr + i_b * stride_ib + o_s * stride_it, mask=m_s, other=-2)  # [BT]
    m_eq = b_id_t[:, None] == b_id_s[None, :]  # [BT, BT]; masked rows never match (-1 vs -2)
    if HAS_PAD:
        m_eq = m_eq & (b_id_t != pad)[:, None]
    p_g = g_ptr + i_b * stride_gb
    b_gram = _gram_tile(p_g, p_g, o_t, o_s, m_t, m_s, d, stride_gt, stride_gd, stride_gt,
                        stride_gd, BLOCK_T, BLOCK_T, BLOCK_K, UPCAST, DOT_PREC, False,
                        False)  # [BT, BT]
    b_val = tl.where(m_eq, b_gram, 0.0)
    tl.store(part_ptr + i_b * n_pairs + i_pair, weight * tl.sum(tl.sum(b_val, axis=1), axis=0))


def embedding_norm_fwd(ids: torch.Tensor, g: torch.Tensor, out: torch.Tensor,
                       padding_idx: int | None = None, config: EmbeddingNormConfig | None = None,
                       empty=torch.empty, fp32_mode: str | None = None) -> None:
    """ids (B, T) int, g (B, T, d) -> writes out (B,) fp32. Caller validates; B, T > 0.
    fp32_mode "tf32r" runs IEEE fp32 here (g is book-kept unrounded); "tf32x3" | "ieee" as named."""
    bsz, seq, d = g.shape
    cfg = config or embedding_norm_config(seq)
    mode = _unrounded(resolve_mode(fp32_mode, cfg.fp32_dot, g.device))
    pairs = tile_pairs(triton.cdiv(seq, cfg.BLOCK_T), str(g.device))
    n_pairs = pairs.shape[0]
    part = empty(bsz, n_pairs, dtype=torch.float32, device=g.device)
    _embedding_norm_fwd_kernel[(n_pairs, bsz)](
        ids_ptr=ids, g_ptr=g, pairs_ptr=pairs, part_ptr=part, seq=seq, d=d, n_pairs=n_pairs,
        pad=-3 if padding_idx is None else padding_idx,
        stride_ib=ids.stride(0), stride_it=ids.stride(1),
        stride_gb=g.stride(0), stride_gt=g.stride(1), stride_gd=g.stride(2),
        HAS_PAD=padding_idx is not None, BLOCK_T=cfg.BLOCK_T, BLOCK_K=cfg.BLOCK_K,
        UPCAST=g.device.type != "cuda", DOT_PREC=dot_precision(mode, g),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out.copy_(part.sum(dim=1, dtype=torch.float64))  # fp64 sum of partials: 1 rounding


@triton.jit
def _tied_cross_fwd_kernel(ids_ptr, ge_ptr, ah_ptr, gh_ptr, part_ptr, seq, s_len, d, pad,
                           stride_ib, stride_it, stride_geb, stride_get, stride_ged,
                           stride_ahb, stride_ahs, stride_ahd,
                           stride_ghb, stride_ghs, stride_ghv,
                           HAS_PAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                           ROUND_HEAD: tl.constexpr):
    i_s = tl.program_id(0)
    i_t = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    o_s = (i_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    o_t = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    m_s = o_s < s_len
    m_t = o_t < seq
    b_id = tl.load(ids_ptr + i_b * stride_ib + o_t * stride_it, mask=m_t, other=0)  # [BT]
    if HAS_PAD:
        m_t = m_t & (b_id != pad)
    # [BS, BT] logit gradients gathered at the t-tile's tokens
    p_gh = gh_ptr + i_b * stride_ghb + o_s[:, None] * stride_ghs + b_id[None, :].to(tl.int64) * stride_ghv
    b_gh = tl.load(p_gh, mask=m_s[:, None] & m_t[None, :], other=0.0).to(tl.float32)
    if ROUND_HEAD:  # the lm_head operands as the book-keeping kernel rounds them
        b_gh = _round_tf32(b_gh)
    b_gram = _gram_tile(ah_ptr + i_b * stride_ahb, ge_ptr + i_b * stride_geb, o_s, o_t, m_s, m_t, d,
                        stride_ahs, stride_ahd, stride_get, stride_ged,
                        BLOCK_S, BLOCK_T, BLOCK_K, UPCAST, DOT_PREC, ROUND_HEAD,
                        False)  # [BS, BT]
    n_tiles = tl.num_programs(0) * tl.num_programs(1)
    tl.store(part_ptr + i_b * n_tiles + i_s * tl.num_programs(1) + i_t,
             tl.sum(tl.sum(b_gh * b_gram, axis=1), axis=0))


def tied_cross_fwd(ids: torch.Tensor, g_emb: torch.Tensor, a_head: torch.Tensor,
                   g_head: torch.Tensor, out: torch.Tensor, padding_idx: int | None = None,
                   config: EmbeddingNormConfig | None = None, empty=torch.empty,
                   fp32_mode: str | None = None) -> None:
    """ids (B, T), g_emb (B, T, d), a_head (B, S, d), g_head (B, S, V) -> out (B,) fp32 = ⟨E_i, H_i⟩.
    Caller validates; B, T, S > 0. fp32_mode "tf32r": a_head and g_head rounded to TF32 (as the
    linear book-keeping rounds them), g_emb not; the dot in IEEE fp32."""
    bsz, seq, d = g_emb.shape
    s_len = a_head.shape[1]
    cfg = config or embedding_norm_config(max(seq, s_len))
    mode = resolve_mode(fp32_mode, cfg.fp32_dot, g_emb.device)
    grid = (triton.cdiv(s_len, cfg.BLOCK_T), triton.cdiv(seq, cfg.BLOCK_T), bsz)
    part = empty(bsz, grid[0] * grid[1], dtype=torch.float32, device=g_emb.device)
    _tied_cross_fwd_kernel[grid](
        ids_ptr=ids, ge_ptr=g_emb, ah_ptr=a_head, gh_ptr=g_head, part_ptr=part, seq=seq,
        s_len=s_len, d=d, pad=-3 if padding_idx is None else padding_idx,
        stride_ib=ids.stride(0), stride_it=ids.stride(1),
        stride_geb=g_emb.stride(0), stride_get=g_emb.stride(1), stride_ged=g_emb.stride(2),
        stride_ahb=a_head.stride(0), stride_ahs=a_head.stride(1), stride_ahd=a_head.stride(2),
        stride_ghb=g_head.stride(0), stride_ghs=g_head.stride(1), stride_ghv=g_head.stride(2),
        HAS_PAD=padding_idx is not None, BLOCK_S=cfg.BLOCK_T, BLOCK_T=cfg.BLOCK_T,
        BLOCK_K=cfg.BLOCK_K,
        # tl.dot needs one operand dtype: mixed or half-rounded inputs are upcast
        UPCAST=(g_emb.device.type != "cuda" or g_emb.dtype != a_head.dtype
                or rounds(mode, a_head, g_head)),
        DOT_PREC=dot_precision(_unrounded(mode), g_emb, a_head),
        ROUND_HEAD=rounds(mode, a_head, g_head),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out.copy_(part.sum(dim=1, dtype=torch.float64))  # fp64 sum of partials: 1 rounding
