"""The tape: what the wrapped layers leave during one backward pass, handed on when it ends.

The first record of a backward pass queues a callback on the autograd engine that runs once the
whole backward has finished; it hands the records ({parameter: [uses]}) to `on_backward_end` (the
engine's clip + book-keeping) and clears the tape, so nothing outlives its backward pass.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch


class GradTape:
    def __init__(self, on_backward_end: Callable[[dict], None]):
        self.on_backward_end = on_backward_end
        self.uses: dict = {}
        self._queued = False
        # Batch size of the current forward pass (set by the first wrapped layer, reset by the
        # root module's forward and after each backward): lets shared-across-batch embedding ids
        # be expanded to per-sample ones.
        self.batch_hint: int | None = None
        # Autocast casts each Linear's input separately, so q/k/v (gate/up) read three equal
        # low-precision copies of one tensor. A token names "this tensor, at this version, cast to
        # this dtype": the layers of one token record one copy, and the norms share one Gram.
        self._last_cast: tuple | None = None
        self._inputs: dict = {}

    def cast_token(self, x: torch.Tensor, dtype: torch.dtype) -> object:
        """The token of `x` cast to `dtype`: the previous token when the previous cast was of this
        very tensor object (alive, same in-place version), a new one otherwise."""
        last = self._last_cast
        if last is not None and last[0]() is x and last[1] == x._version and last[2] == dtype:
            return last[3]
        token = object()
        self._last_cast = (weakref.ref(x), x._version, dtype, token)
        return token

    def shared_input(self, token: object | None, a: torch.Tensor) -> torch.Tensor:
        """The first input recorded in this backward under `token` (a bit-identical copy of `a`,
        cast from the same tensor), else `a` itself."""
        if token is None:
            return a
        prev = self._inputs.setdefault(token, a)
        if prev is a or (prev.shape == a.shape and prev.stride() == a.stride()
                         and prev.dtype == a.dtype and prev.device == a.device):
            return prev
        return a

    def record(self, param: torch.nn.Parameter, use) -> None:
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            self._queued = True
        self.uses.setdefault(param, []).append(use)

    def _flush(self) -> None:
        uses, self.uses, self._queued, self.batch_hint = self.uses, {}, False, None
        self._inputs, self._last_cast = {}, None
        self.on_backward_end(uses)
