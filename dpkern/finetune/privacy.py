"""The privacy plan of a run: σ from (ε, δ, q, steps) with the tight accountant, and the report.

Calibration happens before the model is loaded, so an impossible budget (one that needs more noise
than any useful run can carry) is an error before training, not a run that learns nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dpkern.finetune.config import FinetuneConfig, FinetuneError

# Past this σ (noise std per released coordinate = σ·C, every step) a run learns nothing useful;
# a budget that needs more is reported as impossible for the requested steps.
MAX_USEFUL_SIGMA = 50.0


@dataclass
class PrivatePlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    target_epsilon: float | None

    def report(self, cfg: FinetuneConfig, steps_done: int, epsilon: float | None, n_train: int,
               engine=None) -> dict:
        """The privacy report written to privacy.json (what the numbers mean is in the README)."""
        return {
            "private": True,
            "epsilon": epsilon,
            "delta": cfg.delta,
            "accountant": cfg.accountant,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "noise_std_per_coordinate": self.noise_multiplier * cfg.max_grad_norm,
            "max_grad_norm": cfg.max_grad_norm,
            "clipping": cfg.clipping,
            "sample_rate": self.sample_rate,
            "expected_batch_size": cfg.batch_size,
            "steps": steps_done,
            "train_rows": n_train,
            "sampling": "Poisson (each row joins each step's batch with probability q)",
            "unit": "one training row (one text with its label, or one line for causal-LM); "
                    "add/remove-one adjacency",
            "method": cfg.method,
            "secure_mode": cfg.secure_mode,
            "noise_steps": getattr(engine and engine.optimizer, "noise_steps", None),
            "not_covered": "dev-set model selection touches only the dev rows, never the "
                           "training rows; the logged train loss is a non-private diagnostic",
        }


def calibrate(cfg: FinetuneConfig, n_train: int, steps: int) -> PrivatePlan:
    """σ for the run (given, or the smallest σ whose ε(δ) ≤ target: never overshoots)."""
    from dpkern.accounting import get_noise_multiplier

    if cfg.batch_size > n_train:
        raise FinetuneError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training rows "
                            "(the sampling rate q = batch/N must be <= 1)")
    q = cfg.batch_size / n_train
    if cfg.delta >= 1.0 / n_train:
        raise FinetuneError(f"--delta {cfg.delta:g} is not below 1/N = {1.0 / n_train:.3g}: such a "
                            "δ allows releasing a whole row; use a smaller --delta")
    if cfg.noise_multiplier is not None:
        return PrivatePlan(float(cfg.noise_multiplier), q, steps, None)
    try:
        sigma = get_noise_multiplier(cfg.epsilon, cfg.delta, q, steps, accountant=cfg.accountant,
                                     sigma_max=MAX_USEFUL_SIGMA)
    except ValueError as e:
        raise FinetuneError(
            f"--epsilon {cfg.epsilon:g}: impossible budget for {steps} steps at q = {q:.4g} "
            f"(δ = {cfg.delta:g}): it needs σ > {MAX_USEFUL_SIGMA:g}, noise that drowns any "
            f"signal. Use fewer --steps/--epochs, a smaller --batch-size, or a larger --epsilon. "
            f"({e})") from None
    if not math.isfinite(sigma) or sigma <= 0:
        raise FinetuneError(f"--epsilon {cfg.epsilon:g}: calibration gave σ = {sigma}")
    return PrivatePlan(sigma, q, steps, cfg.epsilon)
