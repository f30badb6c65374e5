"""Process-group helpers: who am I, shared secrets from rank 0, bucketed sum all-reduce.

Everything here also works without torch.distributed initialised (world size 1, no collectives),
so single-process code paths and tests run the same functions.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

# NVLink multicast (NVLS / symmetric memory) stays off on the GPU machines we use: set these in
# every process that may touch NCCL, before the process group is created.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}

_SMALL = 1 << 20  # tensors below this many elements are all-reduced through flat buckets
_BUCKET = 1 << 25  # elements per flat bucket (128 MiB of fp32)


def disable_nvlink_multicast() -> None:
    """Set NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 in this
    process's environment (inherited by processes it starts). Call before init_process_group."""
    os.environ.update(NO_MULTICAST_ENV)


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def comm_device(group=None) -> torch.device:
    """The device collectives of `group` take tensors on: the current CUDA device for NCCL."""
    if is_distributed(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(data: bytes | None, n: int, group=None, src: int = 0) -> bytes:
    """`data` (n bytes, given on the source rank) on every rank of `group`."""
    if not is_distributed(group):
        if data is None or len(data) != n:
            raise ValueError(f"broadcast_bytes: need {n} bytes on the source rank")
        return bytes(data)
    buf = torch.zeros(n, dtype=torch.uint8, device=comm_device(group))
    if rank(group) == src:
        if data is None or len(data) != n:
            raise ValueError(f"broadcast_bytes: need {n} bytes on the source rank")
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=dist.get_global_rank(group, src) if group is not None else src,
                   group=group)
    return bytes(buf.cpu().tolist())


def shared_secret(n: int, group=None) -> bytes:
    """n bytes from os.urandom on rank 0, the same on every rank (the noise key, sampling seed)."""
    return broadcast_bytes(os.urandom(n) if rank(group) == 0 else None, n, group)


def all_reduce_sum_(tensors: list[torch.Tensor], group=None) -> None:
    """In place: every tensor becomes its sum over the ranks of `group` (same list on every rank:
    same order, shapes, dtypes). Small tensors travel through flat buckets, large ones in place;
    all collectives are issued before the first wait."""
    if not is_distributed(group) or world_size(group) == 1 or not tensors:
        return
    works, buckets, pending, size = [], [], [], 0

    def flush():
        nonlocal pending, size
        if pending:
            flat = torch.cat([t.reshape(-1) for t in pending])
            works.append(dist.all_reduce(flat, group=group, async_op=True))
            buckets.append((flat, pending))
        pending, size = [], 0

    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("all_reduce_sum_: tensors must be contiguous")
        if t.numel() >= _SMALL:
            works.append(dist.all_reduce(t, group=group, async_op=True))
            continue
        if pending and (pending[0].dtype != t.dtype or pending[0].device != t.device
                        or size + t.numel() > _BUCKET):
            flush()
        pending.append(t)
        size += t.numel()
    flush()
    for w in works:
        w.wait()
    for flat, parts in buckets:
        o = 0
        for t in parts:
            t.copy_(flat[o:o + t.numel()].view_as(t))
            o += t.numel()


def broadcast_module_(module: torch.nn.Module, group=None, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (what DDP does at construction)."""
    if not is_distributed(group) or world_size(group) == 1:
        return
    gsrc = dist.get_global_rank(group, src) if group is not None else src
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=gsrc, group=group)
