"""Noise mechanisms the engine accepts (Gaussian, LMO-DP), their accounting and LMO-DP's search."""
from dpkern.mechanisms.lmo_params import PAPER_DEFAULT, LMOParams

__all__ = ["LMOParams", "PAPER_DEFAULT"]
