"""DPOptimizer: wraps any torch optimizer; adds noise once per logical step and scales by the public
expected batch size.

Flow of one logical step: each backward pass ends in the engine, which adds Σ_i c_i G_i of that
(micro-)batch to `summed` (fp32). `step()` then forms, for every private parameter,

    grad = (summed + N(0, (σC)²)) / B_expected        (loss_reduction="mean"; "sum": no division)

runs the post-processors (e.g. RMT denoising) on these noisy gradients, hands them to the inner
optimizer as p.grad and steps it, then calls the step hooks (the accountant). When the inner
optimizer is SGD or AdamW (Adam with weight_decay=0) (`fused_update_available()`), the update
runs in the fused kernel instead (dpkern.noise.fused_noisy_step; p.grad stays None): with no
post-processors noise and update are one pass and the noisy gradient is never materialised;
with post-processors, one multi-tensor pass writes the noisy gradients into the accumulators
(fused_noisy_release_), the post-processors run on them, and a noise-free fused update follows
(`last_step_path`: "fused", "release" or "unfused"). An LMO-DP mechanism runs there too (its own
noise, drawn in the same kernels). Every path draws z from one NoiseGenerator at counter step =
the release index (`noise_steps`), the mechanism's stream and each parameter's global element
offset, so they add the same noise; the generator's state is in state_dict(). An empty logical batch
(reported by the DP data loader, or `signal_empty_batch()`) may step without a backward: it
releases noise only. Everything else without a new backward is refused.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch.optim import Optimizer

from dpkern.noise import NoiseGenerator
from dpkern.noise.step import (AdamWHyper, SGDHyper, fused_noisy_release_, fused_noisy_step,
                               new_step_tensors)

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
            noisy averaged gradients (fp32) before the update; noise_std = σC / B_expected.
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
        # Counter-based noise: secret key from os.urandom unless a seed is given (never in secure
        # mode); counter step = release index.
        self.noise_generator = (NoiseGenerator() if seed is None
                                else NoiseGenerator(secure=False, seed=int(seed)))
        self.noise_backend: str | None = None  # fused/materialised noise backend (None: auto)
        # False forces the materialised path (p.grad then holds the noisy averaged gradient).
        self.fused = True
        # loss_reduction="sum" with the released sum still divided by the expected batch size
        # (the update of "mean" without its B_realized rounding; see engine_README.md).
        self.average_sum = False
        # A non-Gaussian dpkern.mechanisms.Mechanism (set by make_private): adds its own noise.
        self.mechanism = None
        # The private parameters this optimizer updates, in model order.
        in_opt = {p for g in optimizer.param_groups for p in g["params"]}
        self.params = OrderedDict((p, n) for p, n in private_params.items() if p in in_opt)
        # Global element offsets of the private parameters, laid end to end in model order (a
        # sharded subclass may replace them with its own; they must not overlap).
        self.global_offsets, off = {}, 0
        for p in self.params:
            self.global_offsets[p] = off
            off += p.numel()
        self.summed: dict = {}
        self.backwards = 0  # backward passes since the last step (micro-batches)
        self.samples = 0  # rows seen since the last step (realized; never used to normalise)
        self.noise_steps = 0  # logical steps that released noise: the noise counter
        self._nonfinite = 0  # per-sample gradients zeroed because not finite (total; see property)
        self._nonfinite_pending: list = []  # device counts not yet read (no host sync per backward)
        self.step_hooks: list[Callable[["DPOptimizer"], None]] = []
        self._empty_batch = False
        self._release_step: int | None = None
        self._acc_offsets: dict = {}
        self._private_ids: tuple | None = None  # (self.params, {id(p)}) for _private_of
        self.last_clip: dict = {}
        self.last_scales: dict = {}
        self._released: dict = {}
        self.last_step_path: str | None = None  # "fused" | "release" | "unfused" (see step())
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
    # True: the engine book-keeps parameter by parameter in model order (no grouped launches, no
    # B = 1 shortcut) and calls param_summed(p) as soon as summed[p] is final for the backward, so
    # a sharded subclass can reduce it and free the full-size sum before the next one is written.
    sum_each_param = False

    def param_summed(self, p: torch.nn.Parameter) -> None:
        """summed[p] holds this backward's clipped sum of p (called with sum_each_param only)."""

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
        if isinstance(nonfinite, torch.Tensor):
            self._nonfinite_pending.append(nonfinite)
        else:
            self._nonfinite += int(nonfinite)

    @property
    def nonfinite_samples(self) -> int:
        """Per-sample gradients zeroed because they were not finite, in total (reading it syncs)."""
        if self._nonfinite_pending:
            self._nonfinite += int(sum(int(t) for t in self._nonfinite_pending))
            self._nonfinite_pending = []
        return self._nonfinite

    @nonfinite_samples.setter
    def nonfinite_samples(self, value: int) -> None:
        self._nonfinite, self._nonfinite_pending = int(value), []

    def signal_batch(self, rows: int) -> None:
        """The data loader handed out a logical batch of `rows` rows (0: an empty batch)."""
        self._empty_batch = int(rows) == 0

    def signal_empty_batch(self) -> None:
        """The current logical batch is empty: the next step() may run without a backward."""
        self._empty_batch = True

    # ---- noise ------------------------------------------------------------------------------
    def add_noise_(self, acc: torch.Tensor, std: float) -> None:
        """acc += N(0, std²) on every coordinate (acc fp32/fp64), drawn from the noise generator at
        the counter step of the release in progress and acc's parameter's global offset (a call
        outside step() reserves a fresh counter step: noise is never reused)."""
        if std <= 0 and self.mechanism is None:
            return
        off = self._acc_offsets.get(id(acc))
        if off is None:
            off = next((self.global_offsets[p] for p, a in self.summed.items() if a is acc), 0)
        step = self._release_step
        if step is None:
            step = self.noise_generator.next_step()
        from dpkern.mechanisms.noise_ops import gaussian_noise_add_
        flat = acc if acc.dtype == torch.float32 else acc.float()
        if self.mechanism is not None:
            self.mechanism.add_noise_(flat, generator=self.noise_generator, step=step,
                                      offset=int(off), backend=self.noise_backend)
        else:
            gaussian_noise_add_(flat, std=float(std), words=self.noise_generator.kernel_words(step),
                                offset=int(off), backend=self.noise_backend)
        if flat is not acc:
            acc.copy_(flat)

    def _fused_hyper(self, group):
        """SGDHyper / AdamWHyper for a param group, or None when the fused kernel cannot run it."""
        opt = self.original_optimizer
        if group.get("maximize") or group.get("differentiable"):
            return None
        if type(opt) is torch.optim.SGD:
            return SGDHyper(lr=float(group["lr"]), momentum=group["momentum"],
                            dampening=group["dampening"], nesterov=group["nesterov"],
                            weight_decay=group["weight_decay"])
        adam = type(opt) is torch.optim.Adam and group["weight_decay"] == 0 \
            and not group.get("decoupled_weight_decay", False)
        if (adam or type(opt) is torch.optim.AdamW) and not group.get("amsgrad"):
            b1, b2 = group["betas"]
            return AdamWHyper(lr=float(group["lr"]), beta1=float(b1), beta2=float(b2),
                              eps=group["eps"], weight_decay=group["weight_decay"])
        return None

    def _fused_mechanism_ok(self) -> bool:
        """No mechanism (Gaussian), or an LMO-DP one whose add_noise_ is LMOMechanism's own: the
        kernel draws exactly that noise; an overridden add_noise_ could add something else."""
        if self.mechanism is None:
            return True
        from dpkern.mechanisms.lmo import LMOMechanism
        return isinstance(self.mechanism, LMOMechanism) and self.mechanism.fused_step_supported()

    def fused_update_available(self) -> bool:
        """True when step() updates the private parameters with the fused kernel, with no torch
        optimizer step (SGD / AdamW / Adam without weight decay, add_noise_ not overridden,
        contiguous fp32 / bf16 parameters; Gaussian noise or an LMO-DP mechanism); with
        post-processors, after the noisy release pass."""
        if (not self.fused or not self._fused_mechanism_ok()
                or type(self).add_noise_ is not _BASE_ADD_NOISE):
            return False
        if not all(p.is_contiguous() and p.dtype in (torch.float32, torch.bfloat16)
                   for p in self.params):
            return False
        return all(self._fused_hyper(g) is not None for g in self.param_groups)

    def fused_available(self) -> bool:
        """True when step() runs noise and update in one fused pass, the noisy gradient never
        materialised: fused_update_available() and no post-processors."""
        return not self.grad_postprocessors and self.fused_update_available()

    @torch.no_grad()
    def _release(self, std: float, norm: float, step: int) -> OrderedDict:
        """The noisy release pass: acc <- (acc + std z) / norm for every private parameter, one
        launch per device (the z of the fused step); returns {name: acc} for the post-processors."""
        by_dev: dict = {}
        for p in self.params:
            by_dev.setdefault(p.device, []).append(p)
        for ps in by_dev.values():
            fused_noisy_release_([self.accumulator(p) for p in ps],
                                 noise_std=std if self.mechanism is None else None,
                                 expected_batch_size=norm, noise=self.noise_generator,
                                 counter_step=step,
                                 global_offsets=[self.global_offsets[p] for p in ps],
                                 mechanism=self.mechanism, backend=self.noise_backend)
        return OrderedDict((name, self.accumulator(p)) for p, name in self.params.items())

    @torch.no_grad()
    def _fused_step(self, std: float, norm: float, step: int, released: dict | None = None) -> None:
        """The fused update of every private parameter from its accumulator with noise std (or the
        mechanism's) and B = norm; or, given released {param: noisy gradient}, a noise-free update
        from those (noise_std 0, B 1: what the one-pass step would have done, bit for bit)."""
        if released is not None:
            std, norm = 0.0, 1.0
        mechanism = self.mechanism if released is None else None
        state = self.state
        for group in self.param_groups:
            hyper = self._fused_hyper(group)
            adam = isinstance(hyper, AdamWHyper)
            by_t: dict = {}  # t -> ([params], [their states])
            for p in self._private_of(group):
                st = state[p]
                for k in ("exp_avg", "exp_avg_sq", "momentum_buffer"):  # torch's bf16 states:
                    v = st.get(k)
                    if v is not None and v.dtype != torch.float32:  # widened, exactly
                        st[k] = v.float()
                if adam:
                    if "exp_avg" not in st:
                        st["step"] = torch.tensor(0.0)
                        st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                        st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    t = int(st["step"]) + 1
                else:
                    first = st.get("momentum_buffer") is None
                    if hyper.momentum != 0 and first:
                        st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                    t = 1 if first else 2
                ps, sts = by_t.setdefault(t, ([], []))
                ps.append(p)
                sts.append(st)
            for t, (ps, sts) in by_t.items():
                fused_noisy_step(
                    ps, [self.accumulator(p) if released is None else released[p] for p in ps],
                    [st.get("exp_avg", st.get("momentum_buffer")) for st in sts]
                    if not (isinstance(hyper, SGDHyper) and hyper.momentum == 0) else None,
                    [st["exp_avg_sq"] for st in sts] if adam else None,
                    hyper=hyper, noise_std=std if mechanism is None else None,
                    expected_batch_size=norm, noise=self.noise_generator, t=t, counter_step=step,
                    global_offsets=[self.global_offsets[p] for p in ps],
                    mechanism=mechanism, backend=self.noise_backend)
                if adam:  # float32 CPU step tensors, as torch.optim's
                    for st, t_new in zip(sts, new_step_tensors(t, [None] * len(sts))):
                        st["step"] = t_new
                for p in ps:
                    p.grad = None

    def _private_of(self, group) -> list:
        """The private parameters of a param group, in the group's order (compared by identity,
        against a set of ids kept while self.params stays the same object)."""
        ids = self._private_ids
        if ids is None or ids[0] is not self.params:
            ids = self._private_ids = (self.params, {id(p) for p in self.params})
        return [p for p in group["params"] if id(p) in ids[1]]

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
        norm = (self.expected_batch_size
                if self.loss_reduction == "mean" or self.average_sum else 1)
        step = self.noise_generator.next_step()  # one counter step per release, all parameters
        if self.fused_update_available():
            released = None
            if self.grad_postprocessors:  # noise into the accumulators, post-process, then update
                grads = self._release(std, float(norm), step)
                for post in self.grad_postprocessors:
                    post(grads, std / norm)
                # a post-processor may have replaced an entry: the kernel takes fp32, contiguous
                released = {p: grads[name].to(torch.float32).contiguous()
                            for p, name in self.params.items()}
            self._fused_step(std, float(norm), step, released)
            self._released = {}
            self.last_step_path = "fused" if released is None else "release"
        else:
            grads = OrderedDict()
            self._release_step = step
            try:
                for p, name in self.params.items():
                    acc = self.accumulator(p)
                    self._acc_offsets = {id(acc): self.global_offsets[p]}
                    self.add_noise_(acc, std)
                    grads[name] = acc.div_(norm)
            finally:
                self._release_step, self._acc_offsets = None, {}
            for post in self.grad_postprocessors:
                post(grads, std / norm)
            for p, name in self.params.items():
                p.grad = grads[name].to(p.dtype)
                _match_state_dtypes(self.state[p], p)
            self.original_optimizer.step()
            self._released = {p: (p.grad, p.grad._version) for p in self.params
                              if p.grad is not None}
            self.last_step_path = "unfused"
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
        sd["dpkern"] = {"noise_steps": self.noise_steps, "nonfinite_samples": self.nonfinite_samples,
                        "noise": self.noise_generator.state_dict(),
                        "config": {"noise_multiplier": self.noise_multiplier,
                                   "max_grad_norm": self.max_grad_norm,
                                   "expected_batch_size": self.expected_batch_size,
                                   "loss_reduction": self.loss_reduction},
                        # post-processors with a state (RMTDenoiser's warm start) resume with it
                        "postprocessors": [p.state_dict() if hasattr(p, "state_dict") else None
                                           for p in self.grad_postprocessors]}
        return sd

    def check_state_dict(self, state_dict) -> None:
        """Raises what load_state_dict would refuse, changing nothing: a checkpoint of a
        differently calibrated run, a noise state that would replay noise, another optimizer's
        parameter groups."""
        extra = state_dict.get("dpkern", {})
        for k, v in extra.get("config", {}).items():
            if getattr(self, k) != v:
                raise ValueError(f"load_state_dict: the checkpoint was written with {k}={v!r}, this "
                                 f"optimizer has {k}={getattr(self, k)!r}")
        if "noise" in extra:
            self.noise_generator.check_state(extra["noise"])
        post = extra.get("postprocessors")
        if post is not None and len(post) != len(self.grad_postprocessors):
            raise ValueError(f"load_state_dict: the checkpoint has {len(post)} grad_postprocessors' "
                             f"states, this optimizer has {len(self.grad_postprocessors)} "
                             "post-processors")
        groups, mine = state_dict.get("param_groups"), self.original_optimizer.param_groups
        if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] \
                != [len(g["params"]) for g in mine]:
            raise ValueError("load_state_dict: the checkpoint's parameter groups "
                             f"{[len(g.get('params', ())) for g in groups or []]} do not match this "
                             f"optimizer's {[len(g['params']) for g in mine]}")

    def load_state_dict(self, state_dict) -> None:
        """Restores the inner optimizer, the release count and the noise counter (a resumed run
        neither replays nor skips noise). Refuses a checkpoint of a differently calibrated run;
        every check runs before anything is changed."""
        self.check_state_dict(state_dict)
        state_dict = dict(state_dict)
        extra = state_dict.pop("dpkern", {})
        for p, st in zip(self.grad_postprocessors, extra.get("postprocessors") or []):
            if st is not None and hasattr(p, "load_state_dict"):  # checks all before it changes
                p.load_state_dict(st)
        self.original_optimizer.load_state_dict(state_dict)
        if "noise" in extra:
            self.noise_generator.load_state_dict(extra["noise"])
        self.noise_steps = int(extra.get("noise_steps", 0))
        self.nonfinite_samples = int(extra.get("nonfinite_samples", 0))

    def add_param_group(self, param_group) -> None:
        raise RuntimeError("add_param_group after make_private is not supported: new parameters "
                           "would escape the engine; build the optimizer with all groups first")


def _match_state_dtypes(state: dict, p: torch.Tensor) -> None:
    """The fused step keeps fp32 moments / momentum for bf16 parameters; torch's own optimizers
    want them in the parameter's dtype. Before an unfused step (fused switched off, a
    post-processor added, a checkpoint of a fused run) they are rounded to it, as torch would
    have held them all along."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.shape == p.shape and v.is_floating_point() \
                and v.dtype != p.dtype:
            state[k] = v.to(p.dtype)


_BASE_ADD_NOISE = DPOptimizer.add_noise_  # a subclass overriding add_noise_ gets the unfused path
