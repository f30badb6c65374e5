"""Canaries for the one-run audit: one-hot ("Dirac") inputs, secret coins, scores and guesses.

A Dirac canary is an input x_i = scale * e_{slot_i} on a coordinate (slot) that no other training
example touches. Through a linear layer W [out, dim] its per-sample gradient lives in the single
column W[:, slot_i], so canaries never interfere with each other or with the real data, and with
scale well above the clip norm C every sampled canary contributes exactly C (after clipping) to
its own column. The auditor's score for canary i is the movement of that column along the
direction the canary pushes; an included canary moves it, an excluded one sees only noise.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


def draw_coins(m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[m] bool, each True with probability 1/2. Without a generator the coins come from the OS
    (``secrets``), so nobody, including the training code, can predict them."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (number of canaries) must be an int >= 1, got {m!r}")
    if generator is not None:
        return torch.rand(m, generator=generator) < 0.5
    bits = secrets.randbits(m)
    return torch.tensor([(bits >> i) & 1 == 1 for i in range(m)], dtype=torch.bool)


@dataclass
class DiracCanaries:
    """m one-hot canaries. ``slots`` [m] long: the coordinate each owns; ``included`` [m] bool:
    the secret coins; ``scale``: the input norm (choose it well above C so clipping always binds).

    Example::

        c = DiracCanaries.create(m=1000, dim=1016, slots=torch.arange(16, 1016), scale=100.0)
        x = c.inputs()            # [1000, 1016], row i = 100 * e_{16 + i}
        x_in = c.included_inputs()  # only the rows whose coin came up heads
    """

    slots: torch.Tensor
    included: torch.Tensor
    dim: int
    scale: float

    @classmethod
    def create(cls, m: int, dim: int, slots: torch.Tensor | None = None, scale: float = 100.0,
               generator: torch.Generator | None = None) -> "DiracCanaries":
        """Canaries on ``slots`` (default: the last m coordinates of a ``dim``-wide input)."""
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if slots is None:
            if m > dim:
                raise ValueError(f"m={m} canaries need m distinct coordinates, dim={dim} is too small")
            slots = torch.arange(dim - m, dim)
        slots = torch.as_tensor(slots, dtype=torch.long)
        if slots.dim() != 1 or slots.numel() != m:
            raise ValueError(f"slots must have shape [m={m}], got {tuple(slots.shape)}")
        if slots.unique().numel() != m:
            raise ValueError("slots must be distinct: two canaries sharing a coordinate interfere")
        if int(slots.min()) < 0 or int(slots.max()) >= dim:
            raise ValueError(f"slots must lie in [0, dim={dim})")
        if not (float(scale) > 0.0 and float(scale) < float("inf")):
            raise ValueError(f"scale must be finite and > 0, got {scale!r}")
        return cls(slots=slots, included=draw_coins(m, generator), dim=dim, scale=float(scale))

    @property
    def m(self) -> int:
        return int(self.slots.numel())

    def inputs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[m, dim]: row i is scale * e_{slots[i]}."""
        x = torch.zeros(self.m, self.dim, dtype=dtype)
        x[torch.arange(self.m), self.slots] = self.scale
        return x

    def included_inputs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[#included, dim]: the canaries that go into the training set."""
        return self.inputs(dtype)[self.included]

    def check_disjoint(self, data: torch.Tensor) -> None:
        """Raises if any real example [N, dim] touches a canary coordinate."""
        if data.dim() != 2 or data.shape[1] != self.dim:
            raise ValueError(f"data must have shape [N, dim={self.dim}], got {tuple(data.shape)}")
        if data.shape[0] and bool((data[:, self.slots] != 0).any()):
            raise ValueError("the training data touches canary coordinates: canaries would not be "
                             "isolated (Dirac canaries need coordinates no other example uses)")

    def scores(self, final: torch.Tensor, initial: torch.Tensor | None = None,
               direction: torch.Tensor | None = None) -> torch.Tensor:
        """[m] fp64 scores from weights [out, dim]: <(final - initial)[:, slot_i], direction>.

        ``direction`` [out] is the way an included canary pushes its column (default: all ones, the
        push of the loss ``-sum(W x)``). Higher score = more likely included.
        """
        w = final.detach().double()
        if w.dim() != 2 or w.shape[1] != self.dim:
            raise ValueError(f"final weights must have shape [out, dim={self.dim}], "
                             f"got {tuple(w.shape)}")
        if initial is not None:
            w = w - initial.detach().double()
        cols = w[:, self.slots.to(w.device)]  # [out, m]
        if direction is None:
            direction = torch.ones(w.shape[0], dtype=torch.float64, device=w.device)
        return (direction.double().to(w.device) @ cols).cpu()


def guess(scores: torch.Tensor, k_pos: int, k_neg: int) -> torch.Tensor:
    """[m] int8 guesses: +1 ("in") for the k_pos highest scores, -1 ("out") for the k_neg lowest,
    0 (abstain) for the rest. k_pos and k_neg must be fixed before looking at the scores."""
    m = scores.numel()
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(f"need k_pos, k_neg >= 0 and k_pos + k_neg <= m={m}, got {k_pos}, {k_neg}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite (a NaN score would be ranked arbitrarily)")
    order = torch.argsort(scores, descending=True, stable=True)
    g = torch.zeros(m, dtype=torch.int8)
    g[order[:k_pos]] = 1
    if k_neg:
        g[order[m - k_neg:]] = -1
    return g


def count(guesses: torch.Tensor, included: torch.Tensor) -> tuple[int, int]:
    """(r, v): number of guesses made and number right."""
    truth = torch.where(included, 1, -1).to(torch.int8)
    made = guesses != 0
    return int(made.sum()), int((guesses[made] == truth[made]).sum())
