"""Hugging Face ``transformers.Trainer`` made differentially private with a few lines.

    from dpkern.integrations import DPTrainer, PrivacyArguments
    trainer = DPTrainer(model=model, args=training_args, train_dataset=train_ds,
                        data_collator=collator,
                        privacy_args=PrivacyArguments(target_epsilon=3.0, target_delta=1e-5))
    trainer.train()
    print(trainer.get_epsilon())          # also logged as "epsilon" with every Trainer log

or, for a Trainer an existing script already built: ``trainer = make_trainer_private(trainer,
PrivacyArguments(...))`` before ``trainer.train()``.

What changes inside the Trainer:
  * the training loader draws Poisson batches (each row with probability
    q = per_device_train_batch_size / N; batches vary in size and may be empty);
  * the optimizer the Trainer builds is wrapped by ``dpkern.PrivacyEngine`` (per-sample clipping,
    noise once per step, accountant step), with σ calibrated for the planned steps;
  * the loss is the mean of per-sample losses (``dpkern.losses``), never the batch-coupled HF
    loss; a logical batch runs in micro-batches of ``physical_batch_size`` rows;
  * the Trainer's own gradient-norm clipping is switched off (the engine clips per sample).
Gradient accumulation must be 1: the logical batch is the Poisson batch itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

try:
    from transformers import Trainer
except ImportError as e:  # the integration needs transformers; the rest of dpkern does not
    raise ImportError("dpkern.integrations.hf_trainer needs transformers (pip install "
                      "transformers)") from e


@dataclass
class PrivacyArguments:
    """DP settings for :class:`DPTrainer` (target ε, or a fixed noise_multiplier)."""

    target_epsilon: float | None = 3.0
    target_delta: float = 1e-5
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    clipping: str = "flat"
    accountant: str = "prv"
    physical_batch_size: int | None = None
    secure_mode: bool = False
    seed: int | None = None       # sampling + noise seed: tests only (refused in secure_mode)

    def __post_init__(self):
        if self.noise_multiplier is None:
            if self.target_epsilon is None or not (0 < self.target_epsilon < math.inf):
                raise ValueError(f"target_epsilon must be finite and > 0 (or give "
                                 f"noise_multiplier), got {self.target_epsilon!r}")
        elif not (0 <= self.noise_multiplier < math.inf):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got "
                             f"{self.noise_multiplier!r}")
        if not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")


class DPTrainerMixin:
    """The DP parts of :class:`DPTrainer`; mixed into any Trainer subclass."""

    privacy_args: PrivacyArguments

    def _dp_setup(self, privacy_args: PrivacyArguments) -> None:
        from dpkern.engine import PrivacyEngine
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("gradient_accumulation_steps must be 1 with DP: the logical batch is "
                             "the Poisson batch; set privacy_args.physical_batch_size for memory")
        if self.args.world_size > 1:
            raise ValueError("DPTrainer runs on one process (world_size=1)")
        self.privacy_args = privacy_args
        self.args.max_grad_norm = 0.0  # the engine clips per sample; no batch-level clipping
        self.privacy_engine = PrivacyEngine(accountant=privacy_args.accountant,
                                            secure_mode=privacy_args.secure_mode)
        self.dp_optimizer = None
        self.noise_multiplier = None
        self._dp_loader = None

    # -- data: Poisson batches --------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        from dpkern.data import DPDataLoader, secret_generator
        if self._dp_loader is not None:
            return self._dp_loader
        if self.train_dataset is None:
            raise ValueError("DPTrainer: training requires a train_dataset")
        dataset = self.train_dataset
        collator = self.data_collator
        try:
            import datasets
            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            else:
                collator = self._get_collator_with_removed_columns(collator, "training")
        except ImportError:
            collator = self._get_collator_with_removed_columns(collator, "training")
        n = len(dataset)
        bsz = self.args.per_device_train_batch_size
        if bsz > n:
            raise ValueError(f"per_device_train_batch_size {bsz} exceeds the {n} training rows")
        pa = self.privacy_args
        gen = secret_generator(None if pa.seed is None else pa.seed + 1,
                               secure_mode=pa.secure_mode)
        self._dp_loader = DPDataLoader(dataset, sample_rate=bsz / n, collate_fn=collator,
                                       generator=gen)
        return self._dp_loader

    def _planned_steps(self) -> int:
        per_epoch = len(self.get_train_dataloader())
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        return int(math.ceil(self.args.num_train_epochs * per_epoch))

    # -- optimizer: wrapped by the engine -----------------------------------------------------
    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.dp_optimizer is not None and opt is self.dp_optimizer:
            return opt
        from dpkern.accounting import get_noise_multiplier
        pa = self.privacy_args
        loader = self.get_train_dataloader()
        q, steps = loader.sample_rate, self._planned_steps()
        sigma = pa.noise_multiplier
        if sigma is None:
            sigma = get_noise_multiplier(pa.target_epsilon, pa.target_delta, q, steps,
                                         accountant=pa.accountant)
        self.noise_multiplier = sigma
        _, dp_opt, _ = self.privacy_engine.make_private(
            module=self.model, optimizer=opt, data_loader=None, noise_multiplier=sigma,
            max_grad_norm=pa.max_grad_norm, clipping=pa.clipping, loss_reduction="sum",
            expected_batch_size=self.args.per_device_train_batch_size, sample_rate=q,
            seed=pa.seed)
        # sum of per-sample losses (no 1/B_realized rounded into the gradients), update divided by
        # the expected batch size: the same step as Trainer's mean, for any optimizer
        dp_opt.average_sum = True
        self.optimizer = self.dp_optimizer = dp_opt
        return dp_opt

    # -- one logical step: micro-batches of per-sample losses ---------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        from dpkern.data import batch_rows, microbatches
        from dpkern.losses import per_sample_losses
        model.train()
        inputs = self._prepare_inputs(inputs)
        rows = batch_rows(inputs) or 0
        if rows == 0:  # an empty Poisson batch: the step releases noise only
            self.dp_optimizer.signal_empty_batch()
            return torch.zeros((), device=self.args.device)
        physical = self.privacy_args.physical_batch_size or rows
        total = torch.zeros((), device=self.args.device)
        for mb in microbatches(inputs, physical):
            losses = per_sample_losses(model, mb)
            losses.sum().backward()
            total = total + losses.detach().sum()
        return total / rows

    # -- reporting ----------------------------------------------------------------------------
    def get_epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at δ (default: privacy_args.target_delta)."""
        return self.privacy_engine.get_epsilon(delta or self.privacy_args.target_delta)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self.dp_optimizer is not None:
            logs = {**logs, "epsilon": self.get_epsilon(), "delta": self.privacy_args.target_delta}
        super().log(logs, *args, **kwargs)


class DPTrainer(DPTrainerMixin, Trainer):
    """``transformers.Trainer`` with DP-SGD: same arguments plus ``privacy_args``."""

    def __init__(self, *args, privacy_args: PrivacyArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._dp_setup(privacy_args or PrivacyArguments())


def make_trainer_private(trainer: Trainer, privacy_args: PrivacyArguments | None = None):
    """Turns an already built Trainer (or subclass) into its DP version, in place; returns it.

    Call before ``trainer.train()``. Example: ``make_trainer_private(trainer).train()``.
    """
    if isinstance(trainer, DPTrainerMixin):
        raise ValueError("this Trainer is already private")
    cls = type(trainer)
    trainer.__class__ = type(f"DP{cls.__name__}", (DPTrainerMixin, cls), {})
    trainer._dp_setup(privacy_args or PrivacyArguments())
    return trainer
