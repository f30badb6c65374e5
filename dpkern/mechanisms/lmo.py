"""LMO-DP as a mechanism: Laplace noise with a random inverse scale u per coordinate.

The epsilon LMO-DP reports is not a certified guarantee (README.md in this folder, "Honesty").
dpkern therefore refuses to build the mechanism with that accounting unless the caller opts in
with ``accept_uncertified_epsilon=True``; ``accounting="certified"`` needs no opt-in and accounts
the same noise with a valid (much larger) epsilon.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.integrate import quad

from dpkern.mechanisms import lmo_accountant as acct
from dpkern.mechanisms import noise_ops
from dpkern.mechanisms.base import Mechanism
from dpkern.mechanisms.lmo_params import LMOParams
from dpkern.mechanisms.lmo_ref import DEFAULT_ROUNDS, STREAM_LMO, lmo_blocks

UNCERTIFIED_EXPLANATION = (
    "LMO-DP's epsilon is not a certified differential-privacy guarantee. Its accountant (1) bounds "
    "the RDP of a ONE-dimensional query with sensitivity 1, but the released quantity is a "
    "d-dimensional sum of L2-clipped gradients with independent Laplace noise per coordinate, "
    "whose privacy loss adds up over coordinates; and (2) replaces the mechanism by a Gaussian with "
    "the same one-step (epsilon, delta) before composing over subsampled steps, which no "
    "composition theorem allows (equal one-step (epsilon, delta) does not mean equal privacy "
    "curves). In addition the LMO-DP artifact evaluates the MGF outside its domain. dpkern reports "
    "this number only 'as reported by LMO-DP, not certified'. Pass "
    "accept_uncertified_epsilon=True to train with it anyway, or accounting='certified' to use the "
    "same noise with a valid epsilon (see dpkern/mechanisms/README.md)."
)


class UncertifiedEpsilonError(ValueError):
    """Raised when LMO-DP's reported epsilon would be used without an explicit opt-in."""


class LMOMechanism(Mechanism):
    """LMO-DP noise, Laplace(0, clip_norm / u) per coordinate, u ~ params (see LMOParams).

    Args:
        params: the configuration (e.g. from lmo_search.search).
        clip_norm: C, the per-sample L2 clip norm.
        accounting: "reported" (LMO-DP's own epsilon; needs accept_uncertified_epsilon=True) or
            "certified" (a valid RDP upper bound for the d-dimensional mechanism).
        accept_uncertified_epsilon: the explicit opt-in for accounting="reported".
        mgf_domain: for "reported": "strict" (drop orders where the MGF is undefined) or
            "artifact" (reproduce the artifact's out-of-domain evaluation).
        rounds: Marsaglia-Tsang candidates for Gamma shapes other than 0.5, 1, 2.

    Example::

        mech = LMOMechanism(PAPER_DEFAULT, accounting="certified")
        mech.add_noise_(flat_grad_sum, generator=noise_generator, step=noise_generator.next_step())
        mech.epsilon(sample_rate=q, steps=T, delta=1e-10)   # certified=True
    """

    name = "lmo"
    stream = STREAM_LMO

    def __init__(self, params: LMOParams, clip_norm: float = 1.0, *,
                 accounting: str = "reported", accept_uncertified_epsilon: bool = False,
                 mgf_domain: str = "strict", rounds: int = DEFAULT_ROUNDS) -> None:
        super().__init__(clip_norm)
        if not isinstance(params, LMOParams):
            raise TypeError(f"params must be LMOParams, got {type(params).__name__}")
        if accounting not in ("reported", "certified"):
            raise ValueError(f"accounting must be 'reported' or 'certified', got {accounting!r}")
        if mgf_domain not in acct.MGF_DOMAINS:
            raise ValueError(f"mgf_domain must be one of {acct.MGF_DOMAINS}, got {mgf_domain!r}")
        if accounting == "reported" and accept_uncertified_epsilon is not True:
            raise UncertifiedEpsilonError(UNCERTIFIED_EXPLANATION)
        lmo_blocks(params, rounds)  # validates rounds
        self.params = params
        self.accounting = accounting
        self.mgf_domain = mgf_domain
        self.rounds = rounds
        self.certified = accounting == "certified"

    def noise_std(self) -> float:
        """C * sqrt(2 E[1/u^2]), with E[1/u^2] = int_0^inf t M(-t) dt (finite iff u's law allows)."""
        f = lambda t: t * math.exp(float(acct.log_mgf(self.params, -t)))  # noqa: E731
        val, _ = quad(f, 0, np.inf, limit=200)
        return self.clip_norm * math.sqrt(2 * val)

    def add_noise_(self, grad, *, generator, step, offset=0, backend=None):
        return noise_ops.lmo_noise_add_(grad, self.params, words=self._words(generator, step),
                                        clip_norm=self.clip_norm, offset=offset,
                                        rounds=self.rounds, backend=backend)

    def fused_step_supported(self) -> bool:
        """True when add_noise_ is LMOMechanism's own (not overridden, not patched): then
        dpkern.noise.fused_noisy_step(mechanism=self) adds exactly the noise add_noise_ would, in
        the fused noise + update kernel. DPOptimizer takes the fused path only then."""
        return type(self).add_noise_ is _LMO_ADD_NOISE

    def sample(self, n, *, generator, step, offset=0, device="cpu", backend=None):
        z = noise_ops.lmo_noise_sample(n, self.params, words=self._words(generator, step),
                                       offset=offset,
                                       rounds=self.rounds, device=device, backend=backend)
        return z * self.clip_norm

    def epsilon(self, *, sample_rate, steps, delta):
        """The accounting chosen at construction: reported (certified=False) or certified."""
        if self.accounting == "certified":
            return self.certified_epsilon(sample_rate=sample_rate, steps=steps, delta=delta)
        return self.reported_epsilon(sample_rate=sample_rate, steps=steps, delta=delta)

    def reported_epsilon(self, *, sample_rate, steps, delta):
        """LMO-DP's number, labelled "as reported by LMO-DP, not certified"."""
        return acct.reported_epsilon(self.params, sample_rate=sample_rate, steps=steps, delta=delta,
                                     mgf_domain=self.mgf_domain)

    def certified_epsilon(self, *, sample_rate, steps, delta):
        """A valid upper bound for the noise this mechanism actually adds (any model size)."""
        return acct.certified_epsilon(self.params, sample_rate=sample_rate, steps=steps,
                                      delta=delta)

    def __repr__(self):
        return (f"LMOMechanism({self.params}, clip_norm={self.clip_norm}, "
                f"accounting={self.accounting!r})")


_LMO_ADD_NOISE = LMOMechanism.add_noise_  # what fused_noisy_step's LMO kernels reproduce
