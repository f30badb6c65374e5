"""The raw noise stream on any backend: Philox words and normals of consecutive groups.

For tests (bit-identical uniforms across backends) and for samplers built on the same counters.
"""
from __future__ import annotations

import torch

from dpkern import _alloc
from dpkern._ext import require_cuda_ext
from dpkern.backend import resolve_backend
from dpkern.noise.reference import philox_words, normals


def philox_stream(words: dict, first_group: int, n_groups: int, *, device="cpu",
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Philox outputs and z for groups first_group .. first_group + n_groups - 1.

    Args:
        words: {'k0', 'k1', 'c2', 'c3'} from NoiseGenerator.kernel_words(step).
    Returns:
        (x, z): x int64 [n_groups, 4] holding the uint32 words; z float32 [4 * n_groups], the
        normals of global elements 4 * first_group ... in order.
    """
    if first_group < 0 or n_groups < 0:
        raise ValueError(f"first_group and n_groups must be >= 0, got {first_group}, {n_groups}")
    device = torch.device(device)
    be = resolve_backend(backend, device, op="philox_stream", auto_order=("cuda", "triton"))
    if be == "torch":
        g = torch.arange(first_group, first_group + n_groups, dtype=torch.int64, device=device)
        x = torch.stack(philox_words(g, words), dim=1)
        e = torch.arange(4 * first_group, 4 * (first_group + n_groups), dtype=torch.int64,
                         device=device)
        return x, normals(e, words)
    z = _alloc.empty(4 * n_groups, dtype=torch.float32, device=device)
    if be == "triton":
        from dpkern.kernels.philox import philox_stream as launch
        x = _alloc.empty(n_groups, 4, dtype=torch.int64, device=device)
        launch(x, z, first_group, n_groups, words)
        return x, z
    ext = require_cuda_ext()
    x32 = _alloc.empty(n_groups, 4, dtype=torch.int32, device=device)
    with torch.cuda.device(device):
        ext.philox_normals(words=x32.data_ptr(), z=z.data_ptr(), first_group=first_group,
                           n_groups=n_groups, stream=torch.cuda.current_stream(device).cuda_stream,
                           **words)
    return x32.to(torch.int64) & 0xFFFFFFFF, z
