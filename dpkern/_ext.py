"""The optional compiled extension ``dpkern._C`` and whether it can run here."""
from __future__ import annotations

import functools

try:
    from dpkern import _C  # noqa: F401  (built by setup.py from csrc/)
    _IMPORT_ERROR: str | None = None
except ImportError as e:  # built without nvcc, or DPKERN_SKIP_CUDA=1
    _C = None
    _IMPORT_ERROR = str(e)


@functools.lru_cache(maxsize=None)
def cuda_unavailable_reason() -> str | None:
    """None when the CUDA extension is built and sees a GPU; otherwise why not, in one sentence."""
    if _C is None:
        return ("dpkern was installed without its CUDA extension (dpkern._C could not be imported: "
                f"{_IMPORT_ERROR}); reinstall with nvcc on PATH and DPKERN_SKIP_CUDA unset")
    try:
        n = _C.device_count()
    except RuntimeError as e:
        return f"dpkern's CUDA extension is built but no CUDA GPU is usable ({e})"
    if n == 0:
        return "dpkern's CUDA extension is built but no CUDA GPU is visible"
    return None


def cuda_available() -> bool:
    """True when the CUDA extension is built and a CUDA GPU is visible to it."""
    return cuda_unavailable_reason() is None


def require_cuda_ext():
    """The extension module, or a RuntimeError that says whether the build or the GPU is missing."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend 'cuda' is unavailable: {reason}")
    return _C
