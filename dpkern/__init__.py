"""dpkern: Triton and CUDA C++ kernels for fast, lean differentially private training of LLMs.

Backends: every hot op has a ``torch`` reference, a ``triton`` kernel and, where one exists, a
``cuda`` kernel, chosen with ``backend=`` or ``DPKERN_BACKEND`` (see :mod:`dpkern.backend`).
"""
from dpkern._ext import cuda_available, cuda_unavailable_reason
from dpkern.backend import resolve_backend, triton_available
from dpkern.ops.rownorm import rownorm_sq

__version__ = "0.1.0"

__all__ = [
    "cuda_available",
    "cuda_unavailable_reason",
    "resolve_backend",
    "triton_available",
    "rownorm_sq",
]

from dpkern.engine import PrivacyEngine  # noqa: E402  (the DP engine)

__all__.append("PrivacyEngine")
