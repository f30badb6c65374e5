"""Count the kernel launches of a block of code on any device (CPU under TRITON_INTERPRET=1, or a
GPU): Triton launches (exact: JITFunction.run / the interpreter's run) and the aten ops that would
launch a kernel or a copy on a GPU. Tests pin these counts so that a return to per-layer launches,
per-stack calls and the like fails; bench/bench_denoise.py and bench/subspace_probe.py report them.

    with count_launches() as c:
        ...
    c.total, c.triton, c.aten, c.views   # launches (total = triton + aten); views: no launch
    c.by_name                            # Counter {"triton:<kernel>" | "aten.<op>.<overload>": n}

A few aten ops launch several kernels (a batched Cholesky, a triangular solve), so on a GPU the
aten count differs from what torch.profiler reports (`count_kernels`) by a roughly constant factor.

Example:
    >>> with count_launches() as c:
    ...     _ = torch.ones(3) + 1
    >>> c.total, c.by_name["aten.add.Tensor"]
    (2, 1)
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that move no data on a GPU, so launch nothing there: views and view-like ops (a new
# tensor header over the same storage, conj / neg bits included), allocations (the caching
# allocator, no fill), metadata reads, stream bookkeeping, and host-side pinning (a host memcpy,
# no GPU work). Ops that may copy are not listed: reshape / flatten / unflatten (a copy when no
# view fits), resolve_conj / resolve_neg (materialise a set bit), is_nonzero (a read); the
# composite ones decompose before the dispatch mode sees them. Two are counted only when they
# move data (_AtenCounter): resize_ (out= buffers, usually to their own size; on CUDA, growing a
# storage that holds data copies its old bytes) and _local_scalar_dense (.item(): a
# device-to-host copy from a GPU tensor; on a CPU tensor, e.g. an optimizer's step count, none).
NO_LAUNCH = frozenset({
    # views
    "view", "_unsafe_view", "_reshape_alias", "as_strided", "alias", "detach", "lift_fresh",
    "t", "transpose", "permute", "numpy_T", "expand", "squeeze", "unsqueeze", "diagonal",
    "select", "slice", "narrow", "unbind", "split", "split_with_sizes", "chunk", "unfold",
    "view_as", "view_as_real", "view_as_complex", "real", "conj", "_conj", "_neg_view",
    # allocations
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_",
    # metadata and bookkeeping
    "dim", "size", "stride", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "_has_compatible_shallow_copy_type", "is_pinned", "record_stream",
    # host-side
    "pin_memory", "_pin_memory",
})


class Launches:
    """The counts of one block: by_name holds the launches; `views` counts the aten ops that
    launch nothing (NO_LAUNCH, same-size resizes, reads of CPU values)."""

    def __init__(self):
        self.by_name: Counter = Counter()
        self.views = 0

    @property
    def triton(self) -> int:
        return sum(n for k, n in self.by_name.items() if k.startswith("triton:"))

    @property
    def aten(self) -> int:
        return sum(n for k, n in self.by_name.items() if k.startswith("aten."))

    @property
    def total(self) -> int:
        return self.triton + self.aten

    def top(self, k: int = 15) -> list[tuple[str, int]]:
        return self.by_name.most_common(k)

    def __repr__(self):
        return (f"Launches(total={self.total}, triton={self.triton}, aten={self.aten}, "
                f"views={self.views})")


class _AtenCounter(TorchDispatchMode):
    def __init__(self, res: Launches, inside: list):
        super().__init__()
        self.res = res
        self.inside = inside  # [depth] of Triton launches: the interpreter's own torch ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside[0]:
            return func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        launch = name not in NO_LAUNCH
        if name == "resize_":
            storage = args[0].untyped_storage()
            held, ptr = storage.nbytes(), storage.data_ptr()
            out = func(*args, **(kwargs or {}))
            launch = held > 0 and args[0].untyped_storage().data_ptr() != ptr  # reallocated
        else:
            if name == "_local_scalar_dense":
                launch = args[0].device.type != "cpu"
            out = func(*args, **(kwargs or {}))
        if launch:
            # a copy between devices or into itself is a launch; a no-op .to() never gets here
            self.res.by_name[f"aten.{name}.{func._overloadname}"] += 1
        else:
            self.res.views += 1
        return out


@contextlib.contextmanager
def count_launches():
    """Yields a Launches filled by every Triton launch and aten op inside the block."""
    import triton.runtime.jit as jit
    res = Launches()
    inside = [0]
    patched = []
    targets = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        targets.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    for cls in targets:
        orig = cls.run

        def run(self, *args, _orig=orig, **kwargs):
            if not kwargs.get("warmup", False) and not inside[0]:
                res.by_name["triton:" + getattr(self, "__name__", "?")] += 1
            inside[0] += 1
            try:
                return _orig(self, *args, **kwargs)
            finally:
                inside[0] -= 1
        cls.run = run
        patched.append((cls, orig))
    try:
        with _AtenCounter(res, inside):
            yield res
    finally:
        for cls, orig in patched:
            cls.run = orig


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
