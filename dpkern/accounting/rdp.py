"""Renyi-DP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019), built on Google's dp_accounting.

RDP of the subsampled Gaussian is computed per order and summed over steps; epsilon is the best
conversion over all orders (Balle et al. 2020, the same conversion Opacus uses). This is a rigorous
upper bound, typically 5-10% above the tight PLD value.
"""
from __future__ import annotations

from collections.abc import Sequence

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as _rdp

from dpkern.accounting._base import Accountant

#: Opacus's default orders (1.1 ... 10.9, 12 ... 63) plus 11 and 128 ... 1024 (dp_accounting's set).
DEFAULT_ORDERS: tuple[float, ...] = tuple(_rdp.DEFAULT_RDP_ORDERS)


class RDPAccountant(Accountant):
    """Renyi-DP accountant: a rigorous, slightly loose upper bound on epsilon.

    Example::

        acc = RDPAccountant()
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10_000)
        acc.get_epsilon(1e-5)   # 6.7128
    """

    mechanism = "rdp"

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        super().__init__()
        orders = DEFAULT_ORDERS if orders is None else tuple(float(a) for a in orders)
        if not orders or min(orders) <= 1.0:
            raise ValueError(f"orders must be a non-empty list of numbers > 1, got {orders!r}")
        self.orders = orders

    def _config(self):
        return {"orders": list(self.orders)}

    def _accountant(self, groups) -> dp_accounting.rdp.RdpAccountant:
        acc = dp_accounting.rdp.RdpAccountant(orders=list(self.orders))
        for sigma, q, n in groups:
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            acc.compose(event, n)
        return acc

    def _epsilon(self, groups, delta):
        return float(self._accountant(groups).get_epsilon(delta))

    def get_epsilon_and_order(self, delta: float) -> tuple[float, float]:
        """Epsilon and the RDP order that attains it (a best order at the ends of ``orders``
        means the order range is too narrow)."""
        eps = self.get_epsilon(delta)
        groups = self._groups()
        if not groups:  # nothing spent, or a noiseless step (eps = inf): no order attains it
            return eps, float("nan")
        return eps, float(self._accountant(groups).get_epsilon_and_optimal_order(delta)[1])
