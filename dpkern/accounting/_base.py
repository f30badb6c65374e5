"""What every accountant shares: the step history, input checks, and checkpoint state.

The mechanism is always the Poisson-subsampled Gaussian under add/remove-one adjacency: each step
samples every record with probability ``sample_rate`` (q) and releases the clipped sum plus
N(0, (noise_multiplier * C)^2) noise. An accountant only records (sigma, q, count) triples; each
subclass turns that history into an epsilon for a given delta.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any

STATE_VERSION = 1


def check_noise_multiplier(noise_multiplier: float) -> float:
    """Returns sigma as a float; sigma <= 0 is allowed (it means no privacy: epsilon = inf)."""
    try:
        sigma = float(noise_multiplier)
    except (TypeError, ValueError):
        raise ValueError(f"noise_multiplier must be a number, got {noise_multiplier!r}") from None
    if math.isnan(sigma):
        raise ValueError("noise_multiplier must not be NaN")
    return sigma


def check_sample_rate(sample_rate: float) -> float:
    try:
        q = float(sample_rate)
    except (TypeError, ValueError):
        raise ValueError(f"sample_rate must be a number, got {sample_rate!r}") from None
    if not 0.0 <= q <= 1.0:  # also rejects NaN
        raise ValueError(f"sample_rate must be in [0, 1] (0 = nobody sampled), got {sample_rate!r}")
    return q


def check_steps(steps: int, name: str = "num_steps") -> int:
    if isinstance(steps, bool) or not float(steps).is_integer():
        raise ValueError(f"{name} must be a whole number, got {steps!r}")
    n = int(steps)
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {steps!r}")
    return n


def check_delta(delta: float, name: str = "delta") -> float:
    try:
        d = float(delta)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {delta!r}") from None
    if not 0.0 < d < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {delta!r}")
    return d


def check_epsilon(epsilon: float, name: str = "target_epsilon") -> float:
    try:
        e = float(epsilon)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {epsilon!r}") from None
    if not 0.0 < e < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {epsilon!r}")
    return e


class Accountant(ABC):
    """Base class: ``step`` records, ``get_epsilon`` reads, ``state_dict`` checkpoints.

    ``history`` is a list of ``(noise_multiplier, sample_rate, num_steps)``; consecutive identical
    steps are merged into one entry, so a million identical steps cost one entry (as in Opacus).
    """

    mechanism: str = ""

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Records ``num_steps`` identical steps (default 1).

        Example: ``acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10_000)``.
        """
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        n = check_steps(num_steps)
        if n == 0:
            return
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + n)
        else:
            self.history.append((sigma, q, n))

    def __len__(self) -> int:
        """Total number of steps recorded."""
        return sum(n for _, _, n in self.history)

    def _groups(self) -> list[tuple[float, float, int]] | None:
        """Steps that spend privacy, grouped by (sigma, q) (composition is order-free).

        Returns None when some step has sigma <= 0 and q > 0: the release had no noise, eps = inf.
        Steps with q = 0 sample nobody and spend nothing.
        """
        counts: Counter = Counter()
        for sigma, q, n in self.history:
            if q == 0.0 or n == 0 or sigma == math.inf:
                continue
            if sigma <= 0.0:
                return None
            counts[(sigma, q)] += n
        return [(s, q, n) for (s, q), n in sorted(counts.items())]

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this delta (``math.inf`` if some step had no noise)."""
        delta = check_delta(delta)
        groups = self._groups()
        if groups is None:
            return math.inf
        if not groups:
            return 0.0
        return self._epsilon(groups, delta)

    @abstractmethod
    def _epsilon(self, groups: list[tuple[float, float, int]], delta: float) -> float:
        """Epsilon for a non-empty list of (sigma > 0, 0 < q <= 1, count > 0) groups."""

    def _config(self) -> dict[str, Any]:
        """Constructor arguments that change the answer; saved so a checkpoint restores them."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (JSON- and torch.save-friendly)."""
        return {
            "mechanism": self.mechanism,
            "version": STATE_VERSION,
            "config": self._config(),
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores ``history`` (and checks the accountant kind and its settings match)."""
        if state_dict.get("mechanism") != self.mechanism:
            raise ValueError(f"state_dict is for the {state_dict.get('mechanism')!r} accountant, "
                             f"this is {self.mechanism!r}")
        if state_dict.get("config", {}) != self._config():
            raise ValueError(f"state_dict config {state_dict.get('config')} differs from this "
                             f"accountant's {self._config()}; construct it with the same settings")
        history = []
        for sigma, q, n in state_dict["history"]:
            history.append((check_noise_multiplier(sigma), check_sample_rate(q), check_steps(n)))
        self.history = history

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={len(self)}, history={self.history})"
