"""Test harness.

* No GPU: TRITON_INTERPRET=1 is set before any kernel module is imported, so Triton kernels run on
  CPU tensors; tests marked `gpu` skip.
* Every output dpkern allocates is poisoned with NaN, so an element a kernel forgets to write fails.
* Tolerances: tests/tolerance.py is the written policy.
"""
import contextlib
import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dpkern  # noqa: E402
from dpkern import _alloc  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _poison_outputs():
    _alloc.set_poison(True)
    yield
    _alloc.set_poison(False)


def pytest_report_header(config):
    return [f"dpkern: gpu={HAS_GPU} cuda_ext={dpkern.cuda_available()} "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} torch={torch.__version__}"]


def kernel_devices():
    """Devices a kernel backend test runs on: the GPU when present, else the CPU (interpreter)."""
    return ["cuda"] if HAS_GPU else ["cpu"]


@contextlib.contextmanager
def sync_is_an_error():
    """Inside: any host-GPU synchronisation raises (torch.cuda.set_sync_debug_mode("error")), for
    the GPU tests that a DP backward / step / post-processing issues its work without waiting."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
