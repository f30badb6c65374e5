"""Count the aten operations a block of code dispatches (a device-independent proxy for kernel
launches), so that a test can pin the denoiser's per-call op count and a regression fails.

Views (`aten.view`, `aten.t`, slicing, ...) and metadata-only ops launch no kernel and are counted
apart. On a GPU, kernels launched are what torch.profiler reports (`count_kernels`); a few aten ops
launch several kernels (a batched Cholesky, a triangular solve) and a few none, so the two
counts differ by a roughly constant factor.

Example (tests.denoise.opcount):
    >>> with count_ops() as ops:
    ...     _ = torch.ones(3) + 1
    >>> ops.launching, ops.by_name["aten.add.Tensor"]
    (2, 1)
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only make a new view or read metadata: no kernel.
_NO_KERNEL = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "diagonal",
    "as_strided", "unsqueeze", "squeeze", "alias", "detach", "unbind", "split", "split_with_sizes",
    "unfold", "view_as_real", "view_as_complex", "_reshape_alias", "lift_fresh", "empty",
    "empty_strided", "empty_like", "new_empty", "new_empty_strided", "is_same_size", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "resize_", "_has_compatible_shallow_copy_type",
    "set_", "is_nonzero", "_local_scalar_dense",
}


@dataclass
class OpCount:
    """Counts of one block: `launching` (ops that run a kernel), `views` (the others), and the
    launching ops by name (`aten.<op>.<overload>`)."""
    launching: int = 0
    views: int = 0
    by_name: Counter = field(default_factory=Counter)

    def top(self, k: int = 15) -> list[tuple[str, int]]:
        return self.by_name.most_common(k)


class _Counter(TorchDispatchMode):
    def __init__(self, out: OpCount):
        super().__init__()
        self.out = out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        base = func.overloadpacket.__name__
        if base in _NO_KERNEL:
            self.out.views += 1
        else:
            self.out.launching += 1
            self.out.by_name[f"aten.{base}.{func._overloadname}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops():
    """Yields an OpCount filled by every aten op dispatched inside the block."""
    out = OpCount()
    with _Counter(out):
        yield out


@contextlib.contextmanager
def count_kernels():
    """GPU only: yields a dict whose "kernels" entry, after the block, is the number of CUDA
    kernels launched inside it (torch.profiler; memcpy / memset counted as "copies")."""
    from torch.profiler import ProfilerActivity, profile
    res: dict = {}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield res
        torch.cuda.synchronize()
    kernels = copies = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.lower()
            if "memcpy" in name or "memset" in name:
                copies += 1
            else:
                kernels += 1
    res.update(kernels=kernels, copies=copies)
