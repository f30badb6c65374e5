"""DPOptimizer: wraps any torch optimizer; adds noise once per logical step and scales by the public
expected batch size.

Flow of one logical step: each backward pass ends in the engine, which adds Σ_i c_i G_i of that
(micro-)batch to `summed` (fp32). `step()` then forms, for every private parameter,

    grad = (summed + N(0, (σC)²)) / B_expected        (loss_reduction="mean"; "sum": no division)

runs the post-processors (e.g. RMT denoising) on these noisy gradients, hands them to the inner
optimizer as p.grad and steps it, then calls the step hooks (the accountant). An empty logical batch
(reported by the DP data loader, or `signal_empty_batch()`) may step without a backward: it
releases noise only. Everything else without a new backward is refused.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch.optim import Optimizer

from dpkern.data.poisson import secret_generator

Postprocessor = Callable[[dict, float], None]


class DPOptimizer(Optimizer):
    """Differentially private wrapper of `optimizer` (SGD, Adam, AdamW, ...).

    Args:
        optimizer: the inner torch optimizer; its param_groups / state are shared, so LR schedulers
            and checkpoints work on either object.
        private_params: {parameter: name} of the model's private parameters.
        noise_multiplier: σ >= 0. max_grad_norm: the total clipping norm C (noise std is σC).
        expected_batch_size: B_expected, the public normaliser of loss_reduction="mean".
        grad_postprocessors: callables f(grads: {name: tensor}, noise_std) run in place on the
            noisy averaged gradients before the inner step; noise_std = σC / B_expected.
        seed: fixed noise seed (tests only; refused when secure_mode).
    """

    def __init__(self, optimizer: Optimizer, *, private_params: dict, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, loss_reduction: str = "mean",
                 grad_postprocessors: list | None = None, secure_mode: bool = False,
                 seed: int | None = None):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if int(expected_batch_size) <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.original_optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.loss_reduction = loss_reduction
        self.grad_postprocessors = list(grad_postprocessors or [])
        self.secure_mode = secure_mode
        self._seed = seed
        if seed is not None and secure_mode:
            raise ValueError("seed: an explicit noise seed is not allowed in secure_mode")
        self._generators: dict = {}
        # The private parameters this optimizer updates, in model order.
        in_opt = {p for g in optimizer.param_groups for p in g["params"]}
        self.params = OrderedDict((p, n) for p, n in private_params.items() if p in in_opt)
        self.summed: dict = {}
        self.backwards = 0  # backward passes since the last step (micro-batches)
        self.samples = 0  # rows seen since the last step (realized; never used to normalise)
        self.noise_steps = 0  # logical steps that released noise: the noise counter
        self.nonfinite_samples = 0  # per-sample gradients zeroed because not finite (total)
        self.step_hooks: list[Callable[["DPOptimizer"], None]] = []
        self._empty_batch = False
        self._released: dict = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    # The inner optimizer's state is the state (LR schedulers, checkpoints).
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    def __repr__(self) -> str:
        return (f"DPOptimizer(σ={self.noise_multiplier}, C={self.max_grad_norm}, "
                f"B_expected={self.expected_batch_size}, {self.original_optimizer!r})")

    # ---- called by the engine and the data loader -------------------------------------------
    def accumulator(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 (fp64 for fp64 params) running Σ_i c_i G_i of parameter p."""
        acc = self.summed.get(p)
        if acc is None:
            dt = torch.float64 if p.dtype == torch.float64 else torch.float32
            acc = self.summed[p] = torch.zeros(p.shape, dtype=dt, device=p.device)
        return acc

    def note_backward(self, rows: int, nonfinite: int = 0) -> None:
        self.backwards += 1
        self.samples += int(rows)
        self.nonfinite_samples += int(nonfinite)

    def signal_batch(self, rows: int) -> None:
        """The data loader handed out a logical batch of `rows` rows (0: an empty batch)."""
        self._empty_batch = int(rows) == 0

    def signal_empty_batch(self) -> None:
        """The current logical batch is empty: the next step() may run without a backward."""
        self._empty_batch = True

    # ---- noise: one small function, so the fused kernel can replace it ----------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            seed = None if self._seed is None else self._seed + 7919 * len(self._generators)
            gen = self._generators[device] = secret_generator(seed, secure_mode=self.secure_mode,
                                                              device=device)
        return gen

    def add_noise_(self, acc: torch.Tensor, std: float) -> None:
        """acc += N(0, std²) on every coordinate (acc fp32/fp64)."""
        if std > 0:
            z = torch.empty_like(acc).normal_(0.0, std, generator=self._generator(acc.device))
            acc.add_(z)

    # ---- the step ---------------------------------------------------------------------------
    def _check_grads(self) -> None:
        for p, name in self.params.items():
            g = p.grad
            if g is None:
                continue
            mine = self._released.get(p)
            if mine is None or mine[0] is not g or mine[1] != g._version:
                raise RuntimeError(
                    f"gradients found from outside the engine on parameter {name!r}: autograd "
                    "wrote p.grad directly, so that gradient was never clipped. Is the weight used "
                    "outside its module (e.g. F.linear(x, module.weight)), or did code set .grad?")

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        if self.backwards == 0 and not self._empty_batch:
            raise RuntimeError(
                "optimizer.step() without a new backward pass since the last step (or since "
                "zero_grad()). For an empty Poisson batch use the DP data loader, which reports it, "
                "or call optimizer.signal_empty_batch() first.")
        std = self.noise_multiplier * self.max_grad_norm
        norm = self.expected_batch_size if self.loss_reduction == "mean" else 1
        grads = OrderedDict()
        for p, name in self.params.items():
            acc = self.accumulator(p)
            self.add_noise_(acc, std)
            grads[name] = acc.div_(norm)
        for post in self.grad_postprocessors:
            post(grads, std / norm)
        for p, name in self.params.items():
            p.grad = grads[name].to(p.dtype)
        self.original_optimizer.step()
        self._released = {p: (p.grad, p.grad._version) for p in self.params if p.grad is not None}
        self.noise_steps += 1
        self.summed, self.backwards, self.samples, self._empty_batch = {}, 0, 0, False
        for hook in self.step_hooks:
            hook(self)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drops the gradients and what was summed since the last step. Private parameters' .grad
        is always set to None (a zeroed tensor could hide a gradient written from outside)."""
        for p in self.params:
            p.grad = None
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.summed, self.backwards, self.samples, self._released = {}, 0, 0, {}

    def state_dict(self):
        sd = self.original_optimizer.state_dict()
        sd["dpkern"] = {"noise_steps": self.noise_steps, "nonfinite_samples": self.nonfinite_samples}
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("dpkern", {})
        self.original_optimizer.load_state_dict(state_dict)
        self.noise_steps = int(extra.get("noise_steps", 0))
        self.nonfinite_samples = int(extra.get("nonfinite_samples", 0))

    def add_param_group(self, param_group) -> None:
        raise RuntimeError("add_param_group after make_private is not supported: new parameters "
                           "would escape the engine; build the optimizer with all groups first")
