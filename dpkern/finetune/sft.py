"""``--method dp-sft``: DP fine-tuning in low-rank per-layer subspaces (dpkern.subspace), two stages.

Stage 1 (the first ``sft_stage1_steps`` steps, default a quarter of the run) is plain DP-SGD on the
private data, and a TrajectoryTracker sketches how each projected weight moved (its released
values: post-processing). Stage 2 makes the same model private again with those bases: each
projected weight W (p × d) is clipped and noised on the r × r coordinates Uᵀ G V only; the other
trainable parameters are released in full as before.

Privacy: both stages are DP-SGD steps with the same (σ, q), charged to the one accountant, so the
run's ε is that of all its steps, exactly as for ``dp-sgd`` (σ is calibrated for the whole run).
A public subspace (from non-private data) is not offered here: stage 1 is the honest default.

Projected: trainable ``nn.Linear`` weights whose two sides both exceed the rank (small matrices,
e.g. a 2-class head, gain nothing from a projection and stay full).
"""
from __future__ import annotations

import torch

from dpkern.finetune.config import FinetuneConfig, FinetuneError


def projectable_layers(model: torch.nn.Module, rank: int) -> list[str]:
    """Weight names of trainable Linear layers with min(p, d) > rank, in model order."""
    out = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear) and w is not None and w.requires_grad \
                and min(w.shape) > rank:
            out.append(f"{name}.weight" if name else "weight")
    return out


class SFTStages:
    """Drives the two stages inside the job's loop; its state goes into the checkpoint."""

    def __init__(self, cfg: FinetuneConfig, steps: int, model: torch.nn.Module):
        self.rank = int(cfg.sft_rank)
        self.stage1_steps = cfg.sft_stage1_steps or max(1, steps // 4)
        if not 1 <= self.stage1_steps < steps:
            raise FinetuneError(f"--sft-stage1-steps: must be in [1, {steps - 1}] (stage 2 needs "
                                f"at least one of the {steps} steps), got {self.stage1_steps}")
        self.layers = projectable_layers(model, self.rank)
        if not self.layers:
            raise FinetuneError(f"--method dp-sft: no trainable Linear weight has both sides larger "
                                f"than --sft-rank {self.rank}; lower --sft-rank or train more "
                                "layers (--trainable)")
        self.cfg = cfg
        self.stage = 1
        self.tracker = None
        self.bases: dict | None = None
        self.stage1_noise_steps = 0

    def start(self, model) -> None:
        """After make_private of stage 1: start sketching the trajectory."""
        from dpkern.subspace import TrajectoryTracker
        self.tracker = TrajectoryTracker(model, self.layers, self.rank, seed=0)

    def after_step(self, step: int, engine, model, opt, plan):
        """Called after every logical step; returns the optimizer to use from now on."""
        if self.stage != 1:
            return opt
        self.tracker.update()
        if step < self.stage1_steps:
            return opt
        self.stage1_noise_steps = opt.noise_steps
        return self.switch(engine, model, opt, plan, self.tracker.bases())

    def switch(self, engine, model, opt, plan, bases: dict):
        """Stage 2: the same model, optimizer state and accountant, projected layers."""
        engine.finish_stage(model)
        seed = self.cfg.extra.get("noise_seed")
        inner = opt.original_optimizer
        _, new_opt, _ = engine.make_private(
            module=model, optimizer=inner, data_loader=None,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=self.cfg.max_grad_norm,
            clipping=self.cfg.clipping.replace("-", "_"), loss_reduction="sum",
            expected_batch_size=self.cfg.batch_size, sample_rate=plan.sample_rate,
            seed=None if seed is None else seed + 1,  # tests only: never the stage-1 key
            subspace=bases)
        new_opt.average_sum = True  # as in methods.build: sum of losses, update / expected batch
        engine.optimizer = new_opt
        self.stage, self.bases, self.tracker = 2, bases, None
        return new_opt

    def noise_steps(self, opt) -> int:
        return opt.noise_steps + (self.stage1_noise_steps if self.stage == 2 else 0)

    # ---- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = {"stage": self.stage, "stage1_noise_steps": self.stage1_noise_steps,
              "layers": self.layers, "rank": self.rank}
        if self.stage == 2:
            sd["bases"] = {k: (u.cpu(), v.cpu()) for k, (u, v) in self.bases.items()}
        else:
            t = self.tracker
            sd["tracker"] = {"calls": t.calls, "w0": {k: v.cpu() for k, v in t.w0.items()},
                             "sketch": {k: _sketch_state(s) for k, s in t.sketch.items()}}
        return sd

    def load_state_dict(self, sd: dict, engine, model, opt, plan):
        """Restores the stage; in stage 2 rebuilds the projected optimizer (returned)."""
        if sd["layers"] != self.layers or sd["rank"] != self.rank:
            raise FinetuneError("--resume: the checkpoint's dp-sft layers/rank differ from this "
                                "run's")
        self.stage1_noise_steps = int(sd["stage1_noise_steps"])
        if sd["stage"] == 2:
            return self.switch(engine, model, opt, plan, sd["bases"])
        t = self.tracker
        t.calls = int(sd["tracker"]["calls"])
        for k, v in sd["tracker"]["w0"].items():
            t.w0[k] = v.to(t.w0[k].device)
        for k, s in sd["tracker"]["sketch"].items():
            _load_sketch(t.sketch[k], s, t.w0[k].device)
        return opt

    def report(self) -> dict:
        return {"rank": self.rank, "projected_layers": self.layers,
                "stage1_steps": self.stage1_steps,
                "basis": "trajectory of the private stage 1 (DP-SGD on the training rows; its "
                         "steps are charged to the same accountant)"}


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    return x


def _sketch_state(s) -> dict:
    """The sketch's fields, tensors on the CPU (a checkpoint loads on any device)."""
    d = {k: _to(v, "cpu") for k, v in vars(s).items() if k != "_gen"}
    d["_gen_state"] = s._gen.get_state()
    return d


def _load_sketch(s, d: dict, device) -> None:
    """Restores the fields onto `device` (the tracked weights' device): the checkpoint is read
    onto the CPU, and the next add() sums GPU products into Y_U, Y_V."""
    d = dict(d)
    s._gen.set_state(d.pop("_gen_state"))
    s.__dict__.update({k: _to(v, device) for k, v in d.items()})
