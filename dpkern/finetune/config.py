"""The fine-tuning job's settings: one dataclass, its defaults, and the checks run before training.

Every check here runs before a model is loaded or a batch is drawn, and names the option at fault.
The defaults are the README's first command: MiniLM on SST-2 at (ε=3, δ=1e-5) in under ten minutes
on a 2-core CPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("dp-sgd", "dp-sft", "rmt-denoise", "lmo-dp")
TASKS = ("classification", "causal-lm")
CLIPPINGS = ("flat", "per-layer", "automatic")
BACKENDS = ("auto", "torch", "triton", "cuda")
ACCOUNTANTS = ("prv", "rdp", "gdp", "edgeworth")
TRAINABLE = ("all", "top2", "head", "lora")
MGF_DOMAINS = ("strict", "artifact")  # dpkern.mechanisms.lmo_accountant.MGF_DOMAINS


class FinetuneError(ValueError):
    """A problem with the job's input (options, model, data): reported before any training."""


def repo_root() -> Path:
    """The checkout's root (the folder holding dpkern/)."""
    return Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    """SST-2: ``$DPKERN_SST2`` if set, else beside the checkout (``<repo>/../shared/data/sst2``),
    else inside it (``<repo>/shared/data/sst2``, e.g. a copy that travels with the tree)."""
    import os
    if os.environ.get("DPKERN_SST2"):
        return Path(os.environ["DPKERN_SST2"]).expanduser()
    beside = repo_root().parent / "shared" / "data" / "sst2"
    inside = repo_root() / "shared" / "data" / "sst2"
    return inside if not beside.is_dir() and inside.is_dir() else beside


@dataclass
class FinetuneConfig:
    """Settings of one ``dpkern finetune`` run (the CLI fills this; Python callers may too).

    Privacy: either ``epsilon`` (σ is calibrated by ``accountant`` for the planned steps) or
    ``noise_multiplier`` (ε is then reported, not targeted); for ``method="lmo-dp"``, ``lmo_params``
    (a preset or .json, see dpkern.mechanisms.load_params) fixes the noise the same way.
    ``private=False`` trains the same recipe without clipping or noise (``--compare-nonprivate``
    runs both).
    """

    model: str = "minilm"
    data: str = "sst2"
    task: str = "classification"
    text_column: str = "sentence"
    label_column: str = "label"
    num_labels: int | None = None          # default: inferred from the training labels
    max_length: int = 64
    train_size: int | None = None          # use the first N training rows (None: all)
    dev_size: int | None = 872             # selection rows taken from dev (None: all)
    # privacy
    private: bool = True
    epsilon: float | None = 3.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    clipping: str = "flat"
    accountant: str = "prv"
    method: str = "dp-sgd"
    accept_uncertified_epsilon: bool = False  # lmo-dp only: report LMO-DP's own (uncertified) ε
    lmo_params: str | None = None          # lmo-dp: fixed noise (preset or .json); default: calibrated
    lmo_mgf_domain: str = "strict"         # lmo-dp reported ε: "artifact" evaluates as the paper does
    secure_mode: bool = False
    # optimisation
    # Defaults chosen on dev.tsv only (bench/results/finetune_sweep_h100: lr 2e-2, B 512, 60 steps had
    # the best dev accuracy of 6 settings with the same ~31k rows of compute)
    batch_size: int = 512                  # logical (expected) batch size: q = batch_size / N
    physical_batch_size: int = 256
    epochs: float | None = None            # alternative to steps: steps = epochs * N / batch_size
    steps: int | None = 60
    lr: float = 2e-2
    weight_decay: float = 0.0
    warmup_steps: int = 0
    trainable: str = "head"
    lora_r: int | None = None
    sft_rank: int = 8                      # dp-sft: rank r of each projected layer's subspace
    sft_stage1_steps: int | None = None    # dp-sft: steps of the private stage 1 (default: 1/4)
    # machinery
    backend: str = "auto"
    device: str = "auto"
    output_dir: str | None = None
    resume: bool = False
    eval_every: int | None = None          # default: 4 evaluations over the run
    checkpoint_every: int | None = None    # default: at every evaluation
    seed: int | None = 0                   # model init / shuffling; the DP noise seed stays secret
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def planned_steps(self, n_train: int) -> int:
        """Logical steps of the run for a training set of ``n_train`` rows."""
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(float(self.epochs) * n_train / self.batch_size))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "FinetuneConfig":
        """Checks that need no file: raises FinetuneError naming the option."""
        def bad(option: str, msg: str):
            raise FinetuneError(f"{option}: {msg}")

        if self.task not in TASKS:
            bad("--task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.method not in METHODS:
            bad("--method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.clipping not in CLIPPINGS:
            bad("--clipping", f"must be one of {', '.join(CLIPPINGS)}, got {self.clipping!r}")
        if self.backend not in BACKENDS:
            bad("--backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.accountant not in ACCOUNTANTS:
            bad("--accountant", f"must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.trainable not in TRAINABLE:
            bad("--trainable", f"must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.lmo_params is not None and not (self.private and self.method == "lmo-dp"):
            bad("--lmo-params", "only applies to a private run with --method lmo-dp")
        if self.private:
            if self.method == "lmo-dp" and self.lmo_params is not None:
                pass  # the noise is fixed; ε is reported after the run, not targeted
            elif self.noise_multiplier is not None:
                if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
                    bad("--noise-multiplier", f"must be finite and > 0, got {self.noise_multiplier}")
            elif self.epsilon is None:
                bad("--epsilon", "give --epsilon or --noise-multiplier for a private run")
            elif not (math.isfinite(self.epsilon) and self.epsilon > 0):
                bad("--epsilon", f"must be finite and > 0, got {self.epsilon}")
            if not 0.0 < self.delta < 1.0:
                bad("--delta", f"must be in (0, 1), got {self.delta}")
            if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
                bad("--max-grad-norm", f"must be finite and > 0, got {self.max_grad_norm}")
            if self.method == "lmo-dp" and self.noise_multiplier is not None:
                bad("--noise-multiplier", "--method lmo-dp adds LMO-DP noise, not Gaussian: it is "
                    "calibrated from --epsilon; drop --noise-multiplier")
        if self.accept_uncertified_epsilon and not (self.private and self.method == "lmo-dp"):
            bad("--accept-uncertified-epsilon", "only applies to a private run with --method "
                "lmo-dp")
        if self.lmo_mgf_domain not in MGF_DOMAINS:
            bad("--lmo-mgf-domain", f"must be one of {', '.join(MGF_DOMAINS)}, got "
                f"{self.lmo_mgf_domain!r}")
        if self.lmo_mgf_domain != "strict" and not self.accept_uncertified_epsilon:
            bad("--lmo-mgf-domain", "only applies to LMO-DP's own ε (with "
                "--accept-uncertified-epsilon); the certified ε does not use it")
        if self.batch_size < 1:
            bad("--batch-size", f"must be >= 1, got {self.batch_size}")
        if self.physical_batch_size < 1:
            bad("--physical-batch-size", f"must be >= 1, got {self.physical_batch_size}")
        if self.steps is None and self.epochs is None:
            bad("--steps", "give --steps or --epochs")
        if self.steps is not None and self.steps < 1:
            bad("--steps", f"must be >= 1, got {self.steps}")
        if self.steps is None and not (math.isfinite(self.epochs) and self.epochs > 0):
            bad("--epochs", f"must be finite and > 0, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("--lr", f"must be finite and > 0, got {self.lr}")
        if self.max_length < 2:
            bad("--max-length", f"must be >= 2, got {self.max_length}")
        if self.lora_r is not None and self.lora_r < 1:
            bad("--lora-r", f"must be >= 1, got {self.lora_r}")
        for option, value in (("--train-size", self.train_size), ("--dev-size", self.dev_size),
                              ("--eval-every", self.eval_every),
                              ("--checkpoint-every", self.checkpoint_every),
                              ("--num-labels", self.num_labels), ("--sft-rank", self.sft_rank),
                              ("--sft-stage1-steps", self.sft_stage1_steps)):
            if value is not None and value < 1:
                bad(option, f"must be >= 1, got {value}")
        if self.num_labels is not None and self.num_labels < 2 and self.task == "classification":
            bad("--num-labels", f"must be >= 2, got {self.num_labels}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            bad("--device", f"must be auto, cpu or cuda[:N], got {self.device!r}")
        return self
