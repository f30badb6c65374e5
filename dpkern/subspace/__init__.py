"""DP-SFT: DP fine-tuning in low-rank per-layer subspaces (README.md here).

    subspace_project      fused per-sample S_i = (g_i U)ᵀ (a_i V) and ‖S_i‖² (kernels/subspace_proj.py)
    subspace_project_grouped  the same for many layers of one rank: one launch per layout
    subspace_backproj_step_  fused W ← update(W, U S̃ Vᵀ), SGD/momentum/Adam/AdamW, no p × d gradient
                          (kernels/subspace_backproj.py)
    SubspacePrivacyEngine PrivacyEngine with projected Linear layers (make_private(subspace=...))
    public_gradient_bases / TrajectoryTracker / SubspaceRefresher   where U, V come from
    global_trajectory_basis / GlobalSubspaceDPSGD                    the paper's variant (small models)
"""
from dpkern.subspace.backproj import AdamHyper, backproj_hyper, subspace_backproj_step_
from dpkern.subspace.bases import (LowRankSketch, SubspaceRefresher, TrajectoryTracker,
                                   orthonormalize, public_gradient_bases)
from dpkern.subspace.engine import SubspaceDPOptimizer, SubspacePrivacyEngine, check_basis
from dpkern.subspace.global_variant import (GlobalSubspaceDPSGD, flat_params,
                                            global_trajectory_basis)
from dpkern.subspace.ops import subspace_project, subspace_project_grouped

__all__ = ["subspace_project", "subspace_project_grouped", "subspace_backproj_step_", "AdamHyper", "backproj_hyper",
           "SubspacePrivacyEngine", "SubspaceDPOptimizer", "check_basis",
           "LowRankSketch", "TrajectoryTracker", "public_gradient_bases", "SubspaceRefresher",
           "orthonormalize", "global_trajectory_basis", "GlobalSubspaceDPSGD", "flat_params"]
