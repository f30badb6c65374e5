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
