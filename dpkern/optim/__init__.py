"""The DP optimizer wrapper and the clip-factor rules."""
from dpkern.optim.clipping import CLIPPING_MODES, check_clipping, clip_factors, round_down_f32
from dpkern.optim.dp_optimizer import DPOptimizer

__all__ = ["CLIPPING_MODES", "DPOptimizer", "check_clipping", "clip_factors", "round_down_f32"]
