"""Counter-based secret-keyed Gaussian noise fused with the optimizer step (see README.md here).

    fused_noisy_step   launcher over cuda / triton / torch for lists of tensors
    fused_noisy_release_ the same noise written into the gradients (post-process, then update)
    noisy_step         functional API for the engine
    FusedNoisyOptimizer torch.optim-shaped wrapper
    NoiseGenerator     128-bit key + monotone counter; secure (os.urandom) or deterministic mode
"""
from dpkern.noise.keys import NoiseGenerator
from dpkern.noise.optimizer import FusedNoisyOptimizer, noisy_step
from dpkern.noise.step import AdamWHyper, SGDHyper, fused_noisy_release_, fused_noisy_step

__all__ = ["NoiseGenerator", "FusedNoisyOptimizer", "noisy_step", "fused_noisy_step",
           "fused_noisy_release_", "SGDHyper", "AdamWHyper"]
