"""Fused back-projection + optimizer update of a projected weight (kernels/subspace_backproj.py).

W ← update(W, U S̃ Vᵀ) for SGD (with or without momentum), Adam (L2 weight decay) and AdamW
(decoupled), with the optimizer's states read and written in the torch optimizer's own state dict
(`exp_avg`, `exp_avg_sq`, `step`; `momentum_buffer`), so checkpoints and the unfused path see the
same state. The p × d gradient is never formed by the Triton backend; the torch backend
(dpkern/subspace/reference.py) forms it in fp32 (plain SGD: one addmm, as before).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpkern import _alloc
from dpkern.backend import resolve_backend
from dpkern.noise.step import SGDHyper, new_step_tensors, update_scalars

__all__ = ["AdamHyper", "SGDHyper", "backproj_hyper", "subspace_backproj_step_",
           "subspace_backproj_step_grouped_"]

_PARAM_DTYPES = (torch.float32, torch.bfloat16)
_OPT_SGD, _OPT_SGD_MOMENTUM, _OPT_ADAM = 0, 1, 2  # kernels/subspace_backproj.py


@dataclass(frozen=True)
class AdamHyper:
    """torch.optim.Adam / AdamW hyperparameters. decoupled=True: AdamW (W ← W(1 − lr·wd) before
    the update); False: Adam's L2 (g ← g + wd·W)."""
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False


def backproj_hyper(optimizer: torch.optim.Optimizer, group: dict):
    """SGDHyper / AdamHyper of a param group of torch.optim.SGD / Adam / AdamW.

    Raises NotImplementedError saying why for what the fused update does not do: amsgrad,
    maximize, differentiable, another optimizer class (subclasses included: they may change step).
    """
    kind = type(optimizer)
    if kind not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise NotImplementedError(f"fused back-projection: {kind.__name__} is not supported "
                                  "(torch.optim.SGD, Adam, AdamW)")
    for flag in ("maximize", "differentiable"):
        if group.get(flag):
            raise NotImplementedError(f"fused back-projection: {flag}=True is not supported")
    if kind is torch.optim.SGD:
        return SGDHyper(lr=float(group["lr"]), momentum=float(group["momentum"]),
                        dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]),
                        weight_decay=float(group["weight_decay"]))
    if group.get("amsgrad"):
        raise NotImplementedError("fused back-projection: amsgrad=True is not supported (it keeps "
                                  "a running max of exp_avg_sq); use the unfused path "
                                  "(optimizer.fused_backprojection = False)")
    b1, b2 = group["betas"]
    decoupled = kind is torch.optim.AdamW or bool(group.get("decoupled_weight_decay", False))
    return AdamHyper(lr=float(group["lr"]), beta1=float(b1), beta2=float(b2),
                     eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                     decoupled=decoupled)


def _check_hyper(hyper) -> None:
    if isinstance(hyper, SGDHyper):
        if hyper.nesterov and (hyper.momentum <= 0 or hyper.dampening != 0):
            raise ValueError("hyper: Nesterov momentum needs momentum > 0 and dampening = 0")
        vals = dict(lr=hyper.lr, momentum=hyper.momentum, dampening=hyper.dampening,
                    weight_decay=hyper.weight_decay)
    elif isinstance(hyper, AdamHyper):
        if not (0 <= hyper.beta1 < 1 and 0 <= hyper.beta2 < 1):
            raise ValueError(f"hyper: betas must be in [0, 1), got ({hyper.beta1}, {hyper.beta2})")
        vals = dict(lr=hyper.lr, eps=hyper.eps, weight_decay=hyper.weight_decay)
    else:
        raise TypeError(f"hyper must be SGDHyper or AdamHyper, got {type(hyper).__name__}")
    for k, x in vals.items():
        if not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"hyper.{k} must be a finite number >= 0, got {x!r}")


def _check(w, u, s, v) -> None:
    for name, x in (("w", w), ("u", u), ("s", s), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"subspace_backproj_step_: {name} must be a torch.Tensor, got "
                            f"{type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"subspace_backproj_step_: {name} must be 2-D, got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"subspace_backproj_step_: {name} must be a float tensor, got "
                            f"{x.dtype}")
        if x.device != w.device:
            raise ValueError(f"subspace_backproj_step_: {name} is on {x.device}, w on {w.device}")
    if w.dtype not in _PARAM_DTYPES:
        raise TypeError(f"subspace_backproj_step_: w must be float32 or bfloat16, got {w.dtype}")
    if not w.is_contiguous():
        raise ValueError("subspace_backproj_step_: w must be contiguous")
    p, d = w.shape
    if u.shape[0] != p or v.shape[0] != d or tuple(s.shape) != (u.shape[1], v.shape[1]):
        raise ValueError(f"subspace_backproj_step_: shapes do not chain: w {tuple(w.shape)}, u "
                         f"{tuple(u.shape)}, s {tuple(s.shape)}, v {tuple(v.shape)} (need "
                         "u (p, ru), s (ru, rv), v (d, rv))")


def _state_tensor(state: dict, key: str, w: torch.Tensor):
    """The state tensor `key`, checked (w's shape and device, contiguous, fp32 or w's dtype); a
    fresh fp32 one (poisoned in tests: never read on its first step) when absent. -> (x, fresh)."""
    x = state.get(key)
    if x is None:
        return _alloc.empty(*w.shape, dtype=torch.float32, device=w.device), True
    if not isinstance(x, torch.Tensor) or x.shape != w.shape or x.device != w.device:
        raise ValueError(f"subspace_backproj_step_: state[{key!r}] must be a tensor of w's shape "
                         f"{tuple(w.shape)} on {w.device}")
    if x.dtype not in (torch.float32, w.dtype):
        raise TypeError(f"subspace_backproj_step_: state[{key!r}] is {x.dtype}; float32 or w's "
                        f"dtype {w.dtype} expected")
    if not x.is_contiguous():
        raise ValueError(f"subspace_backproj_step_: state[{key!r}] must be contiguous")
    return x, False


@torch.no_grad()
def subspace_backproj_step_(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                            hyper, state: dict, *, backend: str | None = None,
                            config=None) -> None:
    """One optimizer step of a projected weight on the gradient U S̃ Vᵀ, in place, without a p × d
    gradient (triton backend).

    Args:
        w: (p, d) float32 / bfloat16 contiguous weight, updated in place.
        u: (p, ru), s: (ru, rv) the released S̃ (noisy, divided by the batch normaliser), v (d, rv);
            cast to fp32 (small).
        hyper: SGDHyper (torch.optim.SGD) or AdamHyper (Adam / AdamW); see backproj_hyper.
        state: the torch optimizer's state dict of w (`optimizer.state[w]`), read and updated:
            Adam: "step" (tensor), "exp_avg", "exp_avg_sq"; SGD with momentum: "momentum_buffer".
            Missing states are created in fp32 (as DPOptimizer's fused step does); existing ones
            may be fp32 or w's dtype (e.g. written by the unfused torch step).
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").
        config: a kernels.subspace_backproj.SubspaceBackprojConfig (triton only).

    Example:
        >>> w = torch.zeros(4, 6); st = {}
        >>> u, v = torch.eye(4)[:, :2], torch.eye(6)[:, :3]
        >>> subspace_backproj_step_(w, u, torch.ones(2, 3), v, AdamHyper(lr=0.1), st)
        >>> float(w[0, 0]), int(st["step"])
        (-0.09999998658895493, 1)
    """
    subspace_backproj_step_grouped_([w], [u], [s], [v], hyper, [state], backend=backend,
                                    config=config)


@torch.no_grad()
def subspace_backproj_step_grouped_(ws: list, us: list, ss: list, vs: list, hyper, states: list,
                                    *, backend: str | None = None, config=None) -> None:
    """subspace_backproj_step_ for many weights under one optimizer rule (one param group), in a
    few launches: weights of one layout (shape, dtypes of W and its states, strides of U, S̃, V)
    at one step count (Adam: equal "step"; fresh states together) are updated by ONE launch
    (pointer tables); a weight whose step count or layout differs gets its own. Each weight's
    result is bit for bit what subspace_backproj_step_ gives it alone (same kernel, same
    arithmetic). Arguments are lists over weights, as subspace_backproj_step_'s; config (triton):
    for every layout (default: the heuristic per layout).

    Example:
        >>> ws, sts = [torch.zeros(4, 6), torch.ones(4, 6)], [{}, {}]
        >>> u, v = torch.eye(4)[:, :2], torch.eye(6)[:, :3]
        >>> subspace_backproj_step_grouped_(ws, [u, u], [torch.ones(2, 3)] * 2, [v, v],
        ...                                 AdamHyper(lr=0.1), sts)
        >>> round(float(ws[1][0, 0]), 6), int(sts[1]["step"])
        (0.9, 1)
    """
    n = len(ws)
    if not (len(us) == len(ss) == len(vs) == len(states) == n):
        raise ValueError("subspace_backproj_step_grouped_: ws, us, ss, vs and states must have "
                         "one entry per weight")
    if n == 0:
        return
    _check_hyper(hyper)
    be = resolve_backend(backend, ws[0].device, op="subspace_backproj_step_",
                         implemented=("triton", "torch"), auto_order=("triton",))
    preps = [_prepare(*x, hyper) for x in zip(ws, us, ss, vs, states)]
    if be == "triton":
        from dpkern.kernels.subspace_backproj import (subspace_backproj_config,
                                                      subspace_backproj_launch_grouped, tabled)
        from dpkern.subspace.ops import grouped_launches
        grouped = grouped_launches()
        groups: dict = {}
        for w, (u, s, v, m, q, fresh, t, opt) in zip(ws, preps):
            key = (tuple(w.shape), w.dtype, w.device, u.shape, u.stride(), s.shape, s.stride(),
                   v.shape, v.stride(), None if m is None else m.dtype,
                   None if q is None else q.dtype, fresh, t, opt)
            groups.setdefault(key, []).append((w, u, s, v, m, q))
        adam = isinstance(hyper, AdamHyper)
        for (shape, *_, fresh, t, opt), members in groups.items():
            cfg = config or subspace_backproj_config(shape[0], shape[1],
                                                     max(members[0][1].shape[1],
                                                         members[0][3].shape[1]), ws[0].device)
            kw = dict(scalars=update_scalars(hyper, t), opt=opt, decoupled=adam and hyper.decoupled,
                      nesterov=bool(getattr(hyper, "nesterov", False)), first=fresh, config=cfg)
            ok = [grouped and len(members) > 1 and tabled(x[0], x[1], x[3], x[4], x[5])
                  for x in members]
            table = [x for x, t in zip(members, ok) if t]
            if len(table) > 1:
                subspace_backproj_launch_grouped(table, **kw)
            for x, t in zip(members, ok):  # alone in its layout or not aligned: its own launch
                if not t or len(table) < 2:
                    subspace_backproj_launch_grouped([x], **kw)
    else:
        for w, (u, s, v, m, q, fresh, t, opt) in zip(ws, preps):
            _torch_update(w, u, s, v, m, q, hyper, t, fresh, opt)
    _finish(states, hyper, preps)


def _prepare(w, u, s, v, state, hyper) -> tuple:
    """Checks of one weight; (u, s, v fp32, m, q, fresh, t, opt code)."""
    _check(w, u, s, v)
    if not isinstance(state, dict):
        raise TypeError("state must be the optimizer's per-parameter dict, got "
                        f"{type(state).__name__}")
    u, s, v = (x if x.dtype == torch.float32 else x.float() for x in (u, s, v))
    m = q = None
    fresh = False
    if isinstance(hyper, AdamHyper):
        m, fresh = _state_tensor(state, "exp_avg", w)
        q, fresh_q = _state_tensor(state, "exp_avg_sq", w)
        if fresh != fresh_q or fresh != ("step" not in state):
            raise ValueError("subspace_backproj_step_: state has only part of Adam's "
                             "(step, exp_avg, exp_avg_sq)")
        t = 1 if fresh else int(state["step"]) + 1
        opt = _OPT_ADAM
    elif hyper.momentum != 0:
        m, fresh = _state_tensor(state, "momentum_buffer", w)
        t, opt = 1, _OPT_SGD_MOMENTUM
    else:
        t, opt = 1, _OPT_SGD
    return u, s, v, m, q, fresh, t, opt


def _torch_update(w, u, s, v, m, q, hyper, t, fresh, opt) -> None:
    if opt == _OPT_SGD:  # no state: one rank-r addmm (fp32 W: no p × d temporary)
        wf = w if w.dtype == torch.float32 else w.float()
        if hyper.weight_decay:
            wf.mul_(1.0 - hyper.lr * hyper.weight_decay)
        wf.addmm_(u @ s, v.T, alpha=-hyper.lr)
        if wf is not w:
            w.copy_(wf)
        return
    from dpkern.subspace.reference import backproj_update_ref
    if fresh:
        m.zero_()
        if q is not None:
            q.zero_()
    w_new, m_new, q_new = backproj_update_ref(w, u, s, v, m, q, hyper=hyper, t=t, first=fresh)
    w.copy_(w_new)
    m.copy_(m_new)
    if q is not None:
        q.copy_(q_new)


def _finish(states: list, hyper, preps: list) -> None:
    """The states of the step just taken into the optimizer's state dicts (Adam's new step
    tensors keep the previous ones' dtype and device; fresh ones are float32 on the CPU)."""
    adam = isinstance(hyper, AdamHyper)
    by_t: dict = {}
    for state, (_, _, _, m, q, fresh, t, _) in zip(states, preps):
        if adam:
            if fresh:
                state["exp_avg"], state["exp_avg_sq"] = m, q
            by_t.setdefault(t, []).append(state)
        elif m is not None and fresh:
            state["momentum_buffer"] = m
    for t, sts in by_t.items():
        for state, x in zip(sts, new_step_tensors(t, [st.get("step") for st in sts])):
            state["step"] = x
