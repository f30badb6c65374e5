"""The Gaussian mechanism: std = noise_multiplier * clip_norm on every coordinate, accounted by
dpkern.accounting (a certified upper bound)."""
from __future__ import annotations

import math

import torch

from dpkern.mechanisms import noise_ops
from dpkern.mechanisms.base import Mechanism
from dpkern.mechanisms.lmo_accountant import EpsilonReport


class GaussianMechanism(Mechanism):
    """Example::

        mech = GaussianMechanism(noise_multiplier=1.0, clip_norm=1.0)
        mech.add_noise_(flat_grad_sum, generator=noise_generator, step=noise_generator.next_step())
        mech.epsilon(sample_rate=0.01, steps=10_000, delta=1e-5)   # certified
    """

    name = "gaussian"
    certified = True

    def __init__(self, noise_multiplier: float, clip_norm: float = 1.0, *,
                 accountant: str = "prv") -> None:
        super().__init__(clip_norm)
        sigma = float(noise_multiplier)
        if not sigma > 0 or math.isinf(sigma):
            raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier!r}")
        if accountant not in ("prv", "rdp"):
            raise ValueError(f"accountant must be 'prv' or 'rdp', got {accountant!r}")
        self.noise_multiplier = sigma
        self.accountant = accountant

    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def add_noise_(self, grad, *, generator, step, offset=0, backend=None):
        return noise_ops.gaussian_noise_add_(grad, std=self.noise_std(),
                                             words=self._words(generator, step), offset=offset,
                                             backend=backend)

    def sample(self, n, *, generator, step, offset=0, device="cpu", backend=None):
        out = torch.zeros(n, dtype=torch.float32, device=device)
        return noise_ops.gaussian_noise_add_(out, std=self.noise_std(),
                                             words=self._words(generator, step), offset=offset,
                                             backend=backend)

    def epsilon(self, *, sample_rate, steps, delta):
        if self.accountant == "prv":
            from dpkern.accounting.prv import PRVAccountant as Acc
        else:
            from dpkern.accounting.rdp import RDPAccountant as Acc
        acc = Acc()
        acc.step(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate, num_steps=steps)
        return EpsilonReport(acc.get_epsilon(delta), delta, True,
                             f"certified ({self.accountant.upper()} accountant)",
                             {"sigma": self.noise_multiplier, "sample_rate": sample_rate,
                              "steps": steps})

    def __repr__(self):
        return (f"GaussianMechanism(noise_multiplier={self.noise_multiplier}, "
                f"clip_norm={self.clip_norm})")
