"""Random-matrix-theory denoising of the released DP gradient (singular-value shrinkage).

Pure post-processing of the noisy averaged gradient: it sees only the released gradient and the
public noise std, so the privacy guarantee is unchanged. See README.md in this folder.
"""
from dpkern.denoise.denoiser import RMTDenoiser, denoise_matrices_
from dpkern.denoise.rsvd import adaptive_svd, randomized_svd
from dpkern.denoise.shrinkers import (bulk_edge, kappa_for_false_positive_rate, shrink,
                                      signal_estimate)

__all__ = ["RMTDenoiser", "denoise_matrices_", "adaptive_svd", "randomized_svd", "bulk_edge",
           "kappa_for_false_positive_rate", "shrink", "signal_estimate"]
