"""A wrapped module's link to the engine: its path, which of its parameters are private, the tape."""
from __future__ import annotations

import torch
from torch._C._functorch import unwrap_if_dead

_C_APPLY = torch._C._FunctionBase.__dict__["apply"]


def function_apply(fn: type[torch.autograd.Function]):
    """`fn.apply` without its Python wrapper's per-call work, for the wrapped layers' forwards.

    torch's `Function.apply` is a Python classmethod that, outside functorch transforms, unwraps
    dead functorch wrappers and calls the C++ apply; its Python part is about as costly as the
    C++ call itself, and a 1B Llama's forward makes 735 such calls (host time on small steps).
    This does the same: the C++ apply, with dead wrappers unwrapped, and `fn.apply` itself under
    a functorch transform. The layer Functions define no `setup_context`, so no argument binding
    is skipped (checked here)."""
    if fn.setup_context is not torch.autograd.Function.setup_context:
        raise TypeError(f"{fn.__name__} defines setup_context; call {fn.__name__}.apply")
    c_apply = _C_APPLY.__get__(None, fn)
    active = torch._C._are_functorch_transforms_active

    def apply(*args):
        if active():
            return fn.apply(*args)
        return c_apply(*[unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a for a in args])
    return apply


class Site:
    """One wrapped module. Its autograd Functions call `record` from their backward."""

    def __init__(self, path: str, module: torch.nn.Module, tape, names: tuple[str, ...]):
        self.path = path
        self.tape = tape
        # The module's private parameters by attribute name (frozen ones are left out).
        self.private = {n: getattr(module, n) for n in names
                        if getattr(module, n, None) is not None and getattr(module, n).requires_grad}

    def record(self, name: str, use) -> None:
        p = self.private.get(name)
        if p is not None:
            self.tape.record(p, use)

    def wants(self, name: str) -> bool:
        return name in self.private

    def __deepcopy__(self, memo):
        # copy.deepcopy(private_model) gives a plain, non-private model (its wrapped modules see
        # no site and run their own forward), not a second engine sharing nothing with the first.
        return None


def as_bt(x: torch.Tensor, what: str, path: str) -> torch.Tensor:
    """(B, ..., n) -> (B, T, n) with T the product of the middle dims; B is dim 0 (batch first)."""
    if x.dim() < 2:
        raise RuntimeError(f"{path}: {what} has shape {tuple(x.shape)}; the engine needs a batch "
                           "dimension first (B, ..., features)")
    return x.reshape(x.shape[0], -1, x.shape[-1])
