"""Per-sample squared L2 norm of the rows of a (B, N) tensor, fp32 accumulation."""
from __future__ import annotations

import torch

from dpkern import _alloc
from dpkern._ext import require_cuda_ext
from dpkern.backend import resolve_backend
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
