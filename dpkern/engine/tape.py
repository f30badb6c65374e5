"""The tape: what the wrapped layers leave during one backward pass, handed on when it ends.

The first record of a backward pass queues a callback on the autograd engine that runs once the
whole backward has finished; it hands the records ({parameter: [uses]}) to `on_backward_end` (the
engine's clip + book-keeping) and clears the tape, so nothing outlives its backward pass.
"""
from __future__ import annotations

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

    def record(self, param: torch.nn.Parameter, use) -> None:
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            self._queued = True
        self.uses.setdefault(param, []).append(use)

    def _flush(self) -> None:
        uses, self.uses, self._queued, self.batch_hint = self.uses, {}, False, None
        self.on_backward_end(uses)
