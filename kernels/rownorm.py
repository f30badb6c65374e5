"""Per-row squared L2 norm: out[b] = sum_n float(x[b, n])^2. One program per row."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class RowNormConfig:
    BLOCK_N: int
    num_warps: int


def rownorm_config(n_cols: int) -> RowNormConfig:
    """Heuristic: one pass of up to 4096 columns per loop step, warps scaled with the tile."""
    block = min(max(triton.next_power_of_2(max(n_cols, 1)), 16), 4096)
    return RowNormConfig(BLOCK_N=block, num_warps=max(1, min(8, block // 512)))


def rownorm_search_space():
    """Enumerable configs for autotuning sweeps in bench/."""
    return [RowNormConfig(b, w) for b in (512, 1024, 2048, 4096) for w in (2, 4, 8)]


@triton.jit
def _rownorm_fwd_kernel(x_ptr, out_ptr, n_cols, stride_xb, stride_xn, BLOCK_N: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    b_acc = tl.zeros([BLOCK_N], dtype=tl.float32)  # [BN]
    for start in range(0, n_cols, BLOCK_N):
        o_col = start + o_n
        m_n = o_col < n_cols
        p_x = x_ptr + i_b * stride_xb + o_col.to(tl.int64) * stride_xn
        b_x = tl.load(p_x, mask=m_n, other=0.0).to(tl.float32)  # [BN]
        b_acc += b_x * b_x
    tl.store(out_ptr + i_b, tl.sum(b_acc, axis=0))


def rownorm_sq_fwd(x: torch.Tensor, out: torch.Tensor, config: RowNormConfig | None = None) -> None:
    """Launch on x (B, N) writing out (B,) fp32. Caller validates shapes, dtypes and device."""
    n_rows, n_cols = x.shape
    cfg = config or rownorm_config(n_cols)
    _rownorm_fwd_kernel[(n_rows,)](
        x_ptr=x, out_ptr=out, n_cols=n_cols, stride_xb=x.stride(0), stride_xn=x.stride(1),
        BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps)
