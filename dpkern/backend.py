"""Backend choice: "auto" | "triton" | "cuda" | "torch" (DESIGN.md, Backends).

An explicitly named backend that cannot run raises; "auto" picks the fastest one available for the
op on the tensor's device and never a path with different privacy semantics (all backends of an op
compute the same function). On a machine with no GPU "auto" means "torch".
"""
from __future__ import annotations

import os

import torch

from dpkern._ext import cuda_available, cuda_unavailable_reason

BACKENDS = ("auto", "triton", "cuda", "torch")


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on the CPU only under TRITON_INTERPRET=1 (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: `backend` itself, or DPKERN_BACKEND when it is None (default
    "auto"). Not validated: resolve_backend checks it against the op."""
    return backend if backend is not None else os.environ.get("DPKERN_BACKEND", "auto")


def resolve_backend(backend: str | None, device: torch.device, op: str,
                    implemented: tuple[str, ...] = ("triton", "cuda", "torch"),
                    auto_order: tuple[str, ...] = ("triton", "cuda")) -> str:
    """Return the concrete backend for `op` on `device`, or raise saying why it cannot run.

    backend=None reads DPKERN_BACKEND (default "auto"). `auto_order` lists the fast backends in
    order of preference for this op; "torch" is always the last resort.
    """
    name = requested_backend(backend)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        for cand in auto_order:
            if cand in implemented and _can_run(cand, device):
                return cand
        return "torch"
    if name not in implemented:
        raise NotImplementedError(f"{op}: backend {name!r} is not implemented "
                                  f"(available: {', '.join(implemented)})")
    if name == "cuda":
        if not cuda_available():
            raise RuntimeError(f"{op}: backend 'cuda' is unavailable: {cuda_unavailable_reason()}")
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors; got a tensor on {device}")
    if name == "triton" and not triton_available(device):
        if device.type == "cpu":
            raise ValueError(f"{op}: backend 'triton' needs CUDA tensors (CPU tensors run only "
                             "under TRITON_INTERPRET=1); got a tensor on cpu")
        raise RuntimeError(f"{op}: backend 'triton' is unavailable (triton is not installed "
                           f"or cannot target {device})")
    return name


def _can_run(backend: str, device: torch.device) -> bool:
    if backend == "cuda":
        return cuda_available() and device.type == "cuda"
    if backend == "triton":
        return triton_available(device)
    return True
