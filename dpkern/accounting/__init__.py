"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (DP-SGD).

Which number is what (see README.md in this folder):

* ``RDPAccountant``       rigorous upper bound, a little loose (own exact RDP series).
* ``PRVAccountant``       tight upper bound (PLD, dp_accounting), with a stated discretisation error.
* ``GaussianAccountant``  GDP/CLT: APPROXIMATE, may be below the truth.
* ``EdgeworthAccountant`` estimate (not conservative) and a rigorous bound (``get_epsilon``).

``get_noise_multiplier`` calibrates sigma for a target (epsilon, delta) and never overshoots.
"""
from dpkern.accounting._base import Accountant
from dpkern.accounting.calibration import ACCOUNTANTS, create_accountant, get_noise_multiplier
from dpkern.accounting.edgeworth import EdgeworthAccountant, EdgeworthBoundError
from dpkern.accounting.gdp import GaussianAccountant
from dpkern.accounting.prv import PRVAccountant
from dpkern.accounting.rdp import RDPAccountant

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "EdgeworthAccountant",
    "EdgeworthBoundError",
    "GaussianAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "create_accountant",
    "get_noise_multiplier",
]
