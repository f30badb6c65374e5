"""Sensitivity fuzzing: many neighbouring datasets in one batched pass through the real engine.

The contract: for datasets D and D' = D + {x*}, the pre-noise released sums S(D), S(D') satisfy
||S(D') - S(D)||_2 <= C (fp64 distance), whatever x* is (huge, tiny, zero, NaN, Inf, overflowing
in bf16), and a non-finite x* is zeroed (contributes nothing).

Testing 10^4 pairs one at a time would take minutes, so each round packs K pairs into one model
whose parameters are split into K private blocks: ``nn.Linear(d, K)`` where every example of pair k
puts its loss on output k only. Its gradient (output gradient w_i e_k, outer product with its input)
then lives in row W[k, :] and b[k] only, its per-sample norm is its own, and row k of the engine's
summed gradient is exactly S(D_k). One backward over all K base sets and one over all K base sets
plus their K extra samples give K pairs' distances at once, through the engine's own per-sample
norm, clip-factor and book-keeping code. Each example's per-sample loss is
l_i = w_i * sum_t (W x_it + b)[k_i], so the adversary controls both the input scale and the
output-gradient scale w_i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Magnitudes an adversary may choose for inputs (x) and output gradients (w).
SPECIAL = {
    "normal": 1.0, "zero": 0.0, "tiny": 1e-30, "subnormal": 1e-41, "huge": 1e30,
    "fp32_max": 3.0e38, "bf16_overflow": 3.3e38, "nan": math.nan, "inf": math.inf,
    "neg_inf": -math.inf, "big": 1e8,
}


@dataclass
class Round:
    """One batch of K neighbouring pairs. x: [N, T, d] base examples, w: [N], pair: [N] long;
    x_extra: [K, T, d] (row k: pair k's extra example), w_extra: [K] (the extra example of each pair), bad_extra: [K] bool
    (extra example is non-finite in input or weight). kinds: [K] the adversarial kind of extra."""

    x: torch.Tensor
    w: torch.Tensor
    pair: torch.Tensor
    x_extra: torch.Tensor
    w_extra: torch.Tensor
    bad_extra: torch.Tensor
    kinds: list
    K: int
    d: int


def _draw(n: int, shape: tuple, gen: torch.Generator) -> tuple[torch.Tensor, list]:
    """n fp64 tensors of `shape` (stacked: [n, *shape]) with adversarial kinds drawn from SPECIAL.

    A finite kind scales a standard normal draw; nan / inf / neg_inf poison one random entry.
    """
    names = list(SPECIAL)
    kind = torch.randint(len(names), (n,), generator=gen)
    vals = torch.tensor([SPECIAL[k] for k in names], dtype=torch.float64)[kind]
    base = torch.randn((n, *shape), generator=gen, dtype=torch.float64)
    flat_base = base.view(n, -1)
    poison = ~torch.isfinite(vals)
    out = flat_base * torch.where(poison, 1.0, vals).view(n, 1)
    if n:
        pos = torch.randint(flat_base.shape[1], (n,), generator=gen)
        rows = torch.arange(n)
        out[rows[poison], pos[poison]] = vals[poison]
    return out.view(n, *shape), [names[i] for i in kind.tolist()]


def make_round(K: int, d: int, T: int, max_base: int, gen: torch.Generator) -> Round:
    """K pairs; each has 0..max_base base examples and one extra example. Inputs and output weights
    of every example (base ones too) get adversarial kinds drawn independently from SPECIAL."""
    n_base = torch.randint(max_base + 1, (K,), generator=gen)
    pair = torch.repeat_interleave(torch.arange(K), n_base)
    n = int(pair.numel())
    xb, _ = _draw(n, (T, d), gen)
    wb, _ = _draw(n, (1,), gen)
    xe, kx = _draw(K, (T, d), gen)
    we, kw = _draw(K, (1,), gen)
    w_extra = we.view(K)
    bad = ~(torch.isfinite(xe).flatten(1).all(1) & torch.isfinite(w_extra))
    return Round(x=xb, w=wb.view(n), pair=pair, x_extra=xe,
                 w_extra=w_extra, bad_extra=bad, kinds=[f"x={a},w={b}" for a, b in zip(kx, kw)],
                 K=K, d=d)


def block_sums(summed_w: torch.Tensor, summed_b: torch.Tensor | None) -> torch.Tensor:
    """[K, d + 1] fp64: pair k's part of the released sum (row W[k, :] and b[k])."""
    w = summed_w.double()
    b = (summed_b.double() if summed_b is not None
         else torch.zeros(w.shape[0], dtype=torch.float64)).view(-1, 1)
    return torch.cat([w, b], dim=1)


def per_sample_loss(out: torch.Tensor, pair: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out [N, T, K] -> [N]: l_i = w_i * sum_t out[i, t, pair_i]."""
    idx = pair.view(-1, 1, 1).expand(-1, out.shape[1], 1)
    return w.to(out.dtype) * out.gather(2, idx).squeeze(2).sum(1)
