"""What the engine needs from a noise mechanism.

A mechanism adds its noise, in place, to the flat buffer holding the sum of clipped per-sample
gradients, drawing it from dpkern.noise's counter-based source: noise[i] is a function of (the
NoiseGenerator's secret key, its step, the mechanism's stream tag, global index offset + i) only,
so the noise is the same on one GPU or sharded, and a
(key, counter) pair is never reused across steps. It knows its per-coordinate noise scale and how
it is accounted (``epsilon``), and says whether that epsilon is a certified guarantee.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from dpkern.mechanisms.lmo_accountant import EpsilonReport


class Mechanism(ABC):
    """Base class. Subclasses set ``name`` and ``certified``."""

    name: str = ""
    #: dpkern.noise stream tag (8 bits): distinct mechanisms never share a counter.
    stream: int = 0
    #: True when ``epsilon`` is a proven upper bound for the mechanism actually run.
    certified: bool = True

    def __init__(self, clip_norm: float) -> None:
        c = float(clip_norm)
        if not c > 0 or c == float("inf"):
            raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm!r}")
        self.clip_norm = c

    def _words(self, generator, step: int) -> dict:
        """Kernel words for `step` on this mechanism's stream (dpkern.noise.NoiseGenerator)."""
        if not hasattr(generator, "kernel_words"):
            raise TypeError("generator must be a dpkern.noise.NoiseGenerator, got "
                            f"{type(generator).__name__}")
        return generator.kernel_words(step, stream=self.stream)

    @abstractmethod
    def add_noise_(self, grad: torch.Tensor, *, generator, step: int, offset: int = 0,
                   backend: str | None = None) -> torch.Tensor:
        """grad (contiguous, any shape, treated as flat (n,)) += noise, in place; returns grad."""

    @abstractmethod
    def sample(self, n: int, *, generator, step: int, offset: int = 0, device="cpu",
               backend: str | None = None) -> torch.Tensor:
        """(n,) float32: exactly the noise add_noise_ would add (for audits and tests)."""

    @abstractmethod
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate (absolute, i.e. includes C)."""

    @abstractmethod
    def epsilon(self, *, sample_rate: float, steps: int, delta: float) -> EpsilonReport:
        """Privacy spent by ``steps`` Poisson-subsampled steps at rate ``sample_rate``."""
