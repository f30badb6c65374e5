"""Per-sample projected weight gradients of a Linear layer: S_i = Uᵀ G_i V = (g_i U)ᵀ (a_i V).

a (B, T, d), g (B, T, p), U (p, RU), V (d, RV). G_i = g_iᵀ a_i (p × d) is never formed: each
program projects a tile of tokens of one sample onto the bases on chip ([BT, RU] and [BT, RV]) and
accumulates their product (RU × RV). The T tiles of a sample may be split over N_SPLIT programs
(partials, summed deterministically by the reduce kernel, which also writes ‖S_i‖²). FLOPs per
sample: 2T(p·RU + d·RV + RU·RV). Layers of one layout go in one launch (a third grid axis over
layers, their tensors through a pointer table), and one reduce launch serves a whole rank group.
Math: dpkern/subspace/README.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dpkern.kernels._tables import TL_DTYPE, aligned, layer_ptr, pointer_table


@dataclass(frozen=True)
class SubspaceProjConfig:
    BLOCK_T: int
    BLOCK_K: int
    n_split: int
    num_warps: int
    input_precision: str  # "ieee" | "tf32" for fp32 dots (bf16/fp16 inputs are upcast, exact in tf32)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def subspace_proj_config(bsz: int, n_tok: int, device: torch.device,
                         input_precision: str | None = None, rank: int = 64) -> SubspaceProjConfig:
    """Heuristic: 32-token tiles and a K-loop of 128 up to rank 64; the T tiles are split so that
    about 4 programs per SM run (one tile each at B = 8, T = 512). On the H100 (B = 8, T = 512,
    bf16, bench/results/subspace_probe_h100_4190e8a) this is the fastest or within 10% of it at
    every 1B-model shape for r = 16 and 64 except q/k/v/o at r = 16 (0.15 vs 0.11 ms); the
    former 64-token tiles with 2 programs per SM were up to 5.7x slower at r = 64. Ranks above 64
    hold [RU, RV] + [BT, RU] + [BT, RV] fp32 blocks on chip: a K-loop of 32 and 8 warps keep them
    in registers."""
    big = rank > 64
    block_t = 32
    n_tiles = triton.cdiv(max(n_tok, 1), block_t)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split = min(n_tiles, max(1, triton.cdiv(4 * sms, max(bsz, 1))))
        prec = input_precision or "tf32"
    else:  # interpreter: few programs, exact fp32 dots
        split, prec = 1, input_precision or "ieee"
    return SubspaceProjConfig(BLOCK_T=block_t, BLOCK_K=32 if big else 128, n_split=split,
                              num_warps=8 if big else 4, input_precision=prec)


def subspace_proj_search_space():
    """Enumerable configs for sweeps in bench/ (n_split is filled in from the shape)."""
    return [SubspaceProjConfig(bt, bk, 0, w, "tf32") for bt in (32, 64) for bk in (32, 64, 128)
            for w in (4, 8)]


# Layers of one launch (a third grid axis) reach their tensors through pointer tables
# (kernels/_tables.py), with one extra row of integers: each layer's row of the output.


@triton.jit
def _subspace_proj_fwd_kernel(a_ptr, g_ptr, u_ptr, v_ptr, row_ptr, part_ptr,
                              n_tok, d, p, ru, rv, tiles_per_split,
                              stride_ab, stride_at, stride_ad,
                              stride_gb, stride_gt, stride_gp,
                              stride_up, stride_ur, stride_vd, stride_vr,
                              stride_pl, stride_pb, stride_ps,
                              BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_RU: tl.constexpr, BLOCK_RV: tl.constexpr,
                              PRECISION: tl.constexpr, TABLE: tl.constexpr,
                              A_ELT: tl.constexpr, G_ELT: tl.constexpr, U_ELT: tl.constexpr,
                              V_ELT: tl.constexpr):
    # TABLE: a/g/u/v_ptr are rows of a pointer table over layers (axis 2 the layer) and row_ptr
    # the row of each layer's partials in part (L_all, B, n_split, RU·RV); else one layer, row 0
    i_b = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_l = tl.program_id(2).to(tl.int64)
    a_ptr = layer_ptr(a_ptr, i_l, TABLE, A_ELT)
    g_ptr = layer_ptr(g_ptr, i_l, TABLE, G_ELT)
    u_ptr = layer_ptr(u_ptr, i_l, TABLE, U_ELT)
    v_ptr = layer_ptr(v_ptr, i_l, TABLE, V_ELT)
    i_row = i_l * 0
    if TABLE:
        i_row = tl.load(row_ptr + i_l)
    o_ru = tl.arange(0, BLOCK_RU)
    o_rv = tl.arange(0, BLOCK_RV)
    o_k = tl.arange(0, BLOCK_K)
    m_ru = o_ru < ru
    m_rv = o_rv < rv
    b_s = tl.zeros([BLOCK_RU, BLOCK_RV], dtype=tl.float32)  # [RU, RV]
    n_tiles = tl.cdiv(n_tok, BLOCK_T)
    t_lo = i_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    for i_t in range(t_lo, t_hi):
        o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        m_t = o_t < n_tok
        b_gu = tl.zeros([BLOCK_T, BLOCK_RU], dtype=tl.float32)  # [BT, RU]
        for k0 in range(0, p, BLOCK_K):
            o_kk = k0 + o_k
            m_k = o_kk < p
            p_g = g_ptr + i_b * stride_gb + o_t[:, None].to(tl.int64) * stride_gt \
                + o_kk[None, :].to(tl.int64) * stride_gp
            b_g = tl.load(p_g, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            p_u = u_ptr + o_kk[:, None].to(tl.int64) * stride_up + o_ru[None, :] * stride_ur
            b_u = tl.load(p_u, mask=m_k[:, None] & m_ru[None, :], other=0.0).to(tl.float32)
            b_gu += tl.dot(b_g, b_u, input_precision=PRECISION)  # [BT, BK] @ [BK, RU]
        b_av = tl.zeros([BLOCK_T, BLOCK_RV], dtype=tl.float32)  # [BT, RV]
        for k0 in range(0, d, BLOCK_K):
            o_kk = k0 + o_k
            m_k = o_kk < d
            p_a = a_ptr + i_b * stride_ab + o_t[:, None].to(tl.int64) * stride_at \
                + o_kk[None, :].to(tl.int64) * stride_ad
            b_a = tl.load(p_a, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            p_v = v_ptr + o_kk[:, None].to(tl.int64) * stride_vd + o_rv[None, :] * stride_vr
            b_v = tl.load(p_v, mask=m_k[:, None] & m_rv[None, :], other=0.0).to(tl.float32)
            b_av += tl.dot(b_a, b_v, input_precision=PRECISION)  # [BT, BK] @ [BK, RV]
        b_s += tl.dot(tl.trans(b_gu), b_av, input_precision=PRECISION)  # [RU, BT] @ [BT, RV]
    p_part = part_ptr + i_row * stride_pl + i_b * stride_pb + i_s * stride_ps \
        + o_ru[:, None] * rv + o_rv[None, :]
    tl.store(p_part, b_s, mask=m_ru[:, None] & m_rv[None, :])


@triton.jit
def _subspace_proj_reduce_kernel(part_ptr, s_ptr, norm_ptr, n_split, n_el,
                                 stride_pl, stride_pb, stride_ps, stride_sl, stride_sb, stride_nl,
                                 BLOCK_N: tl.constexpr):
    """S_i = Σ_split partials (fixed order: deterministic); ‖S_i‖² accumulated in fp32. Axis 1:
    the layer (row of part, S and the norms)."""
    i_b = tl.program_id(0).to(tl.int64)
    i_l = tl.program_id(1).to(tl.int64)
    part_ptr += i_l * stride_pl + i_b * stride_pb
    s_ptr += i_l * stride_sl + i_b * stride_sb
    b_sq = tl.zeros([BLOCK_N], dtype=tl.float32)  # [BN]
    for n0 in range(0, n_el, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < n_el
        b_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i_s in range(0, n_split):
            b_acc += tl.load(part_ptr + i_s * stride_ps + o_n, mask=m_n, other=0.0)
        tl.store(s_ptr + o_n, b_acc, mask=m_n)
        b_sq += b_acc * b_acc
    tl.store(norm_ptr + i_l * stride_nl + i_b, tl.sum(b_sq, axis=0))


def subspace_proj_partials(layers: list, part: torch.Tensor, config: SubspaceProjConfig,
                           rows: list | None = None) -> None:
    """Launch the projection of layers of one layout (same B, T, d, p, RU, RV, dtypes and
    strides): layers = [(a (B,T,d), g (B,T,p), u (p,RU), v (d,RV))], float32/16 or bfloat16.
    One layer (rows None): part (B, n_split, RU·RV). Several: one launch over them (pointer
    tables), rows[k] = layer k's row in part (L_all, B, n_split, RU·RV); every tensor
    ALIGN-aligned (see `aligned`). part fp32 contiguous in its last dim. Nothing validated here."""
    a, g, u, v = layers[0]
    bsz, n_tok, d = a.shape
    ru, rv = u.shape[1], v.shape[1]
    cfg = config
    n_tiles = triton.cdiv(max(n_tok, 1), cfg.BLOCK_T)
    table = rows is not None
    if table:
        tab = pointer_table([[x[k] for x in layers] for k in range(4)], a.device, ints=rows)
        ops = dict(a_ptr=tab[0], g_ptr=tab[1], u_ptr=tab[2], v_ptr=tab[3], row_ptr=tab[4])
        stride_pl, (stride_pb, stride_ps) = part.stride(0), part.stride()[1:3]
    else:
        ops = dict(a_ptr=a, g_ptr=g, u_ptr=u, v_ptr=v, row_ptr=part)  # row_ptr: unread
        stride_pl, (stride_pb, stride_ps) = 0, part.stride()[:2]
    _subspace_proj_fwd_kernel[(bsz, cfg.n_split, len(layers))](
        **ops, part_ptr=part,
        n_tok=n_tok, d=d, p=g.shape[2], ru=ru, rv=rv,
        tiles_per_split=triton.cdiv(n_tiles, cfg.n_split),
        stride_ab=a.stride(0), stride_at=a.stride(1), stride_ad=a.stride(2),
        stride_gb=g.stride(0), stride_gt=g.stride(1), stride_gp=g.stride(2),
        stride_up=u.stride(0), stride_ur=u.stride(1), stride_vd=v.stride(0), stride_vr=v.stride(1),
        stride_pl=stride_pl, stride_pb=stride_pb, stride_ps=stride_ps,
        BLOCK_T=cfg.BLOCK_T, BLOCK_K=cfg.BLOCK_K, BLOCK_RU=_pow2(ru), BLOCK_RV=_pow2(rv),
        PRECISION=cfg.input_precision, TABLE=table, A_ELT=TL_DTYPE[a.dtype],
        G_ELT=TL_DTYPE[g.dtype], U_ELT=TL_DTYPE[u.dtype], V_ELT=TL_DTYPE[v.dtype],
        num_warps=cfg.num_warps)


def subspace_proj_reduce(part: torch.Tensor, s_out: torch.Tensor, norm_out: torch.Tensor) -> None:
    """S = Σ_split part and ‖S‖² for L layers in one launch: part (L, B, n_split, RU·RV) fp32,
    s_out (L, B, RU, RV) fp32 with contiguous (RU, RV) matrices, norm_out (L, B) fp32."""
    n_l, bsz, n_split, n_el = part.shape
    _subspace_proj_reduce_kernel[(bsz, n_l)](
        part_ptr=part, s_ptr=s_out, norm_ptr=norm_out, n_split=n_split, n_el=n_el,
        stride_pl=part.stride(0), stride_pb=part.stride(1), stride_ps=part.stride(2),
        stride_sl=s_out.stride(0), stride_sb=s_out.stride(1), stride_nl=norm_out.stride(0),
        BLOCK_N=min(_pow2(n_el), 4096), num_warps=4)


def subspace_proj_fwd(a: torch.Tensor, g: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                      part: torch.Tensor, s_out: torch.Tensor, norm_out: torch.Tensor,
                      config: SubspaceProjConfig) -> None:
    """One layer: a (B,T,d), g (B,T,p), u (p,RU), v (d,RV); part (B, n_split, RU·RV) fp32
    scratch; s_out (B, RU, RV) fp32 contiguous; norm_out (B,) fp32. The caller validates
    everything."""
    subspace_proj_partials([(a, g, u, v)], part, config)
    subspace_proj_reduce(part.unsqueeze(0), s_out.unsqueeze(0), norm_out.unsqueeze(0))
