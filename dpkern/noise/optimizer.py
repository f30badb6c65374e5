"""The engine-facing API: a functional `noisy_step` and a torch-optimizer-shaped FusedNoisyOptimizer."""
from __future__ import annotations

import torch

from dpkern.noise.keys import NoiseGenerator
from dpkern.noise.step import AdamWHyper, SGDHyper, fused_noisy_step


def noisy_step(params, grads_sum, opt_state: dict, hyper, sigma: float, max_grad_norm: float,
               expected_batch_size: float, noise: NoiseGenerator, *, global_offsets=None,
               backend: str | None = None) -> int:
    """One DP release + update: p <- update(p, (grads_sum + sigma * C * z) / expected_batch_size).

    Args:
        params: list of contiguous fp32 / bf16 tensors (updated in place).
        grads_sum: the clipped per-sample gradient sums, one per param (fp32 / bf16), or None for a
            param that got no gradient this step (it is treated as zero: it still gets noise).
        opt_state: dict owned by the caller, filled on first use: {'t': int, 'exp_avg': [fp32],
            'exp_avg_sq': [fp32]} (the lists only when the optimizer needs them).
        hyper: SGDHyper | AdamWHyper.
        sigma, max_grad_norm: the noise multiplier and clipping bound C (std of z's term: sigma*C).
        expected_batch_size: public B_expected.
        noise: NoiseGenerator; one counter step is consumed.
    Returns: the counter step used.
    """
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads_sum)]
    needs_m = isinstance(hyper, AdamWHyper) or (isinstance(hyper, SGDHyper) and hyper.momentum != 0)
    if needs_m and "exp_avg" not in opt_state:
        opt_state["exp_avg"] = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    if isinstance(hyper, AdamWHyper) and "exp_avg_sq" not in opt_state:
        opt_state["exp_avg_sq"] = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    t = opt_state.get("t", 0) + 1
    step = fused_noisy_step(params, grads, opt_state.get("exp_avg"), opt_state.get("exp_avg_sq"),
                            hyper=hyper, noise_std=float(sigma) * float(max_grad_norm),
                            expected_batch_size=expected_batch_size, noise=noise, t=t,
                            global_offsets=global_offsets, backend=backend)
    opt_state["t"] = t
    return step


class FusedNoisyOptimizer(torch.optim.Optimizer):
    """SGD / AdamW whose step() adds DP noise and updates every parameter in one fused pass.

    `p.grad` must hold the clipped per-sample gradient *sum* (not divided by the batch size); step()
    computes p <- update(p, (p.grad + noise_multiplier * max_grad_norm * z) / expected_batch_size).
    A parameter with p.grad None still receives noise (an empty batch still releases noise).

    Args:
        params: iterable of tensors or param-group dicts (groups may override lr, weight_decay,
            momentum, betas, ...). Global offsets are assigned once, in order, over all groups.
        optimizer: "sgd" | "adamw".
        noise_multiplier, max_grad_norm, expected_batch_size: sigma, C, B_expected.
        noise: a NoiseGenerator (default: a new secure one).
        global_offsets: per-parameter global element offsets (sharded models); default end to end.
        backend: "auto" | "cuda" | "triton" | "torch".
    Example:
        >>> opt = FusedNoisyOptimizer(model.parameters(), optimizer="adamw", lr=1e-3,
        ...                           noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=256)
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(self, params, *, optimizer: str = "adamw", lr: float = 1e-3,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
                 noise: NoiseGenerator | None = None, global_offsets=None, backend: str | None = None):
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        momentum=momentum, dampening=dampening, nesterov=nesterov)
        super().__init__(params, defaults)
        self.kind = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.noise = noise if noise is not None else NoiseGenerator()
        self.backend = backend
        all_params = [p for g in self.param_groups for p in g["params"]]
        if global_offsets is None:
            global_offsets, o = [], 0
            for p in all_params:
                global_offsets.append(o)
                o += p.numel()
        if len(global_offsets) != len(all_params):
            raise ValueError(f"global_offsets must have {len(all_params)} entries")
        self._offsets = {id(p): int(o) for p, o in zip(all_params, global_offsets)}

    def _hyper(self, group):
        if self.kind == "adamw":
            return AdamWHyper(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                              eps=group["eps"], weight_decay=group["weight_decay"])
        return SGDHyper(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                        nesterov=group["nesterov"], weight_decay=group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        counter_step = None  # one counter step per logical step, shared by all groups
        for group in self.param_groups:
            params = [p for p in group["params"]]
            if not params:
                continue
            hyper = self._hyper(group)
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    if self.kind == "adamw" or group["momentum"] != 0:
                        st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    if self.kind == "adamw":
                        st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            t = self.state[params[0]]["step"] + 1
            ms = [self.state[p].get("exp_avg") for p in params]
            vs = [self.state[p].get("exp_avg_sq") for p in params]
            if counter_step is None:
                counter_step = self.noise.next_step()
            fused_noisy_step(params, grads, ms if ms[0] is not None else None,
                             vs if vs[0] is not None else None, hyper=hyper,
                             noise_std=self.noise_multiplier * self.max_grad_norm,
                             expected_batch_size=self.expected_batch_size, noise=self.noise, t=t,
                             counter_step=counter_step,
                             global_offsets=[self._offsets[id(p)] for p in params],
                             backend=self.backend)
            for p in params:
                self.state[p]["step"] = t
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["noise"] = self.noise.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        noise_state = state_dict.pop("noise", None)
        if noise_state is None:
            raise KeyError("FusedNoisyOptimizer.load_state_dict: no 'noise' entry (counter state)")
        self.noise.load_state_dict(noise_state)
        super().load_state_dict(state_dict)
