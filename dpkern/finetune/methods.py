"""Which DP method a run uses, and the glue to the engine (``dpkern.PrivacyEngine``).

``dp-sgd``       per-sample clipping + Gaussian noise (the engine).
``rmt-denoise``  dp-sgd, then RMT singular-value shrinkage of every released weight-gradient
                 matrix (``dpkern.denoise``): post-processing, the same ε.
``lmo-dp``       per-sample clipping + LMO-DP noise (``dpkern.mechanisms.LMOMechanism``) instead
                 of the Gaussian; ε is LMO-DP's certified bound unless the run opts into the
                 paper's own (uncertified, labelled) ε. Calibration: privacy.calibrate_lmo.
``dp-sft``       two stages (sft.py): private DP-SGD stage 1 whose trajectory gives per-layer
                 bases, then DP-SGD with the large Linear weights clipped and noised in their
                 r × r subspace (``dpkern.subspace.SubspacePrivacyEngine``); one accountant.
"""
from __future__ import annotations

import importlib

import torch

from dpkern.finetune.config import FinetuneConfig, FinetuneError

_NEEDS = {"dp-sft": "dpkern.subspace", "lmo-dp": "dpkern.mechanisms", "rmt-denoise":
          "dpkern.denoise"}


def _engine_class():
    try:
        from dpkern.engine import PrivacyEngine
    except ImportError as e:
        raise FinetuneError(f"the DP engine (dpkern.engine) is not available: {e}") from None
    return PrivacyEngine


def check_method(cfg: FinetuneConfig) -> str:
    """Returns the method if this build can run it; raises FinetuneError otherwise."""
    if not cfg.private:
        return "none"
    _engine_class()
    if cfg.method == "dp-sgd":
        return cfg.method
    module = _NEEDS[cfg.method]
    try:
        importlib.import_module(module)
    except ImportError:
        raise FinetuneError(f"--method {cfg.method}: not available yet in this build ({module} "
                            "is missing); use --method dp-sgd") from None
    if cfg.method == "dp-sft" and not hasattr(importlib.import_module(module),
                                              "SubspacePrivacyEngine"):
        raise FinetuneError("--method dp-sft: not available in this build (dpkern.subspace has "
                            "no SubspacePrivacyEngine); use --method dp-sgd, rmt-denoise or lmo-dp")
    return cfg.method


def make_private(cfg: FinetuneConfig, method: str, model, optimizer, plan):
    """(engine, model, DP optimizer) for the plan; the caller draws Poisson batches itself."""
    PrivacyEngine = _engine_class()
    post = []
    if method == "rmt-denoise":
        from dpkern.denoise import RMTDenoiser
        post.append(RMTDenoiser.for_model(model))
    if method == "dp-sft":
        from dpkern.subspace import SubspacePrivacyEngine as PrivacyEngine
    engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=cfg.secure_mode,
                           backend=None if cfg.backend == "auto" else cfg.backend)
    try:
        model, optimizer, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=None,
            noise_multiplier=None if plan.mechanism is not None else plan.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            clipping=cfg.clipping.replace("-", "_"), loss_reduction="sum",
            expected_batch_size=cfg.batch_size, sample_rate=plan.sample_rate,
            grad_postprocessors=post or None, mechanism=plan.mechanism,
            seed=cfg.extra.get("noise_seed"))  # tests only: the noise seed stays secret otherwise
    except (ValueError, TypeError) as e:
        raise FinetuneError(f"--model: the DP engine cannot make this model private: {e}") from None
    optimizer.average_sum = True  # sum of per-sample losses, update / expected batch (as "mean")
    engine.optimizer = optimizer
    return engine, model, optimizer


class Sampler:
    """Poisson batches of row indices with a checkpointable generator (secret seed by default)."""

    def __init__(self, n: int, q: float, generator: torch.Generator):
        self.n, self.q, self.generator = n, q, generator

    def batches(self, count: int):
        from dpkern.data import PoissonSampler
        if count <= 0:
            return iter(())
        return iter(PoissonSampler(self.n, self.q, count, self.generator))


def poisson_sampler(n: int, q: float, cfg: FinetuneConfig) -> Sampler:
    from dpkern.data import secret_generator
    seed = cfg.extra.get("sampling_seed")  # tests only: the sampling must stay secret otherwise
    return Sampler(n, q, secret_generator(seed, secure_mode=cfg.secure_mode))
