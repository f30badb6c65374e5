"""Shared helpers of the per-sample ops: input checks, exact-fp32 matmuls, sample chunking."""
from __future__ import annotations

import contextlib

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The torch backend keeps its per-chunk intermediates below this many bytes.
CHUNK_BYTES = 256 << 20


def check_tensor(op: str, name: str, x, rank: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{op}: {name} must have rank {rank}, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be one of ({names}), got {x.dtype}")


def check_same(op: str, what: str, pairs: dict) -> None:
    """pairs: {"a.shape[0]": 3, "g.shape[0]": 4} -> raise naming both when they differ."""
    vals = list(pairs.values())
    if any(v != vals[0] for v in vals[1:]):
        desc = ", ".join(f"{k}={v}" for k, v in pairs.items())
        raise ValueError(f"{op}: {what} must match ({desc})")


def check_device(op: str, tensors: dict) -> None:
    devs = {k: v.device for k, v in tensors.items()}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        desc = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"{op}: all inputs must be on one device ({desc})")


@contextlib.contextmanager
def exact_fp32_matmul(device: torch.device):
    """fp32 matmuls in IEEE fp32 (no TF32) inside the block: norms must not be under-estimated."""
    if device.type != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):
        old = mm.fp32_precision
        mm.fp32_precision = "ieee"
        try:
            yield
        finally:
            mm.fp32_precision = old
    else:  # older torch
        old = mm.allow_tf32
        mm.allow_tf32 = False
        try:
            yield
        finally:
            mm.allow_tf32 = old


def sample_chunks(batch: int, bytes_per_sample: int):
    """Yield slices over the batch so that each chunk's intermediates stay under CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // max(bytes_per_sample, 1))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))
