"""Output allocation for every op. In tests, outputs are poisoned (NaN) so an unwritten element fails."""
from __future__ import annotations

import torch

_POISON = False


def set_poison(enabled: bool) -> None:
    """Fill every output that dpkern allocates with NaN (floats) or -1 (ints). For tests only."""
    global _POISON
    _POISON = bool(enabled)


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs; poisoned when set_poison(True)."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


# Host-computed constants as device tensors, by value: a plain torch.tensor(..., device="cuda") is
# a blocking copy (the host waits for the GPU's whole queue). Callers must not write into them.
_CONST_CACHE: dict = {}
_CONST_CACHE_SIZE = 64


def device_constants(values, device, dtype: torch.dtype) -> torch.Tensor:
    """(len(values),) `dtype` on `device`, uploaded once per distinct values without a host-GPU
    synchronisation (pinned memory, non_blocking) and cached."""
    key = (tuple(values), str(device), dtype)
    hit = _CONST_CACHE.get(key)
    if hit is not None:
        return hit
    host = torch.tensor(key[0], dtype=dtype)
    if torch.device(device).type == "cuda":
        # pinned + non_blocking: the caching host allocator keeps the pinned block alive until
        # the copy has run
        out = host.pin_memory().to(device, non_blocking=True)
    else:
        out = host.to(device)
    if len(_CONST_CACHE) >= _CONST_CACHE_SIZE:
        _CONST_CACHE.pop(next(iter(_CONST_CACHE)))
    _CONST_CACHE[key] = out
    return out
