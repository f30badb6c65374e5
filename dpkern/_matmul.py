"""The precision of fp32 matmuls on CUDA for the length of a block (the ops' exact norms, the
denoiser's TF32 passes). Imports torch only."""
import contextlib

import torch


@contextlib.contextmanager
def fp32_matmul(device: torch.device, precision: str):
    """fp32 matmuls on CUDA in `precision` inside the block ("ieee": exact fp32, "tf32"), the
    former setting restored after; nothing changes on other devices."""
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    if torch.device(device).type != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):
        old = mm.fp32_precision
        mm.fp32_precision = precision
        try:
            yield
        finally:
            mm.fp32_precision = old
    else:  # older torch
        old = mm.allow_tf32
        mm.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            mm.allow_tf32 = old
