"""Noise mechanisms the engine accepts (Gaussian, LMO-DP), their accounting and LMO-DP's search.

LMO-DP's own epsilon is "as reported by LMO-DP, not certified"; see README.md in this folder.
"""
from dpkern.mechanisms.base import Mechanism
from dpkern.mechanisms.gaussian import GaussianMechanism
from dpkern.mechanisms.lmo import LMOMechanism, UncertifiedEpsilonError
from dpkern.mechanisms.lmo_accountant import (EpsilonReport, certified_epsilon, lmo_epsilon,
                                              reported_epsilon, sigma_equivalent)
from dpkern.mechanisms.lmo_params import PAPER_DEFAULT, PRESETS, LMOParams, load_params
from dpkern.mechanisms.lmo_search import search as lmo_search
from dpkern.mechanisms.noise_ops import gaussian_noise_add_, lmo_noise_add_

__all__ = ["Mechanism", "GaussianMechanism", "LMOMechanism", "UncertifiedEpsilonError",
           "LMOParams", "PAPER_DEFAULT", "PRESETS", "load_params", "EpsilonReport", "lmo_epsilon",
           "sigma_equivalent", "reported_epsilon", "certified_epsilon", "lmo_search", "lmo_noise_add_",
           "gaussian_noise_add_"]
