"""Plain-PyTorch ground truth for the subspace ops: forms every per-sample gradient G_i explicitly."""
from __future__ import annotations

import math

import torch


def per_sample_grads_ref(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G_i = g_iᵀ a_i in float64: a (B, T, d), g (B, T, p) -> (B, p, d)."""
    return torch.einsum("btp,btd->bpd", g.double(), a.double())


def subspace_project_ref(a: torch.Tensor, g: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
    """(S, ‖S‖²) in float64 with S_i = Uᵀ G_i V, G_i formed explicitly (slow, obviously right).

    a (B, T, d), g (B, T, p), u (p, RU), v (d, RV) -> S (B, RU, RV), norms (B,).
    """
    G = per_sample_grads_ref(a, g)
    s = torch.einsum("pr,bpd,ds->brs", u.double(), G, v.double())
    return s, s.square().sum(dim=(1, 2))


def dpsft_clipped_sum_ref(model: torch.nn.Module, x: torch.Tensor, per_sample_loss, bases: dict,
                          max_grad_norm: float, factors: torch.Tensor | None = None):
    """Σ_i c_i (projected or full) per-sample gradient, in float64, the slow way.

    Every per-sample gradient is formed (torch.func, on a float64 copy of the plain model); a
    weight named in `bases` ({name: (U, V)}) contributes S_i = Uᵀ G_i V, every other trainable
    parameter its full G_i; c_i = min(1, C / ‖(all coordinates of sample i)‖). per_sample_loss
    (model_output of one sample (1, ...)) -> scalar. `factors` (B,) replaces c_i (e.g. the
    engine's, after checking its bounds against the norms returned here).
    Returns ({name: summed (fp64)}, per-sample norms (B,) fp64).
    """
    import copy

    from torch.func import functional_call, grad, vmap
    m = copy.deepcopy(model).double()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}

    def one(pd, xi):
        return per_sample_loss(functional_call(m, pd, (xi.unsqueeze(0),)))

    gs = vmap(grad(one), in_dims=(None, 0))(params, x.double())
    coords = {}
    for n in names:
        if n in bases:
            u, v = (t.double() for t in bases[n])
            coords[n] = torch.einsum("pr,bpd,ds->brs", u, gs[n], v)
        else:
            coords[n] = gs[n]
    sq = sum(c.flatten(1).square().sum(1) for c in coords.values())
    c = torch.clamp(max_grad_norm / sq.sqrt(), max=1.0) if factors is None else factors.double()
    return {n: torch.einsum("b,b...->...", c, t) for n, t in coords.items()}, sq.sqrt()


def backproj_update_ref(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                        m: torch.Tensor | None, q: torch.Tensor | None, *, hyper, t: int,
                        first: bool, compute_dtype=torch.float32):
    """One optimizer step of W (p, d) on the materialised gradient G = (U S̃) Vᵀ, in
    `compute_dtype`; returns new (W, m, q) (None where the optimizer has no such state).

    hyper: dpkern.noise.step.SGDHyper (coupled weight decay, momentum with dampening, Nesterov;
    `first`: the buffer starts as the gradient, as torch.optim.SGD) or
    dpkern.subspace.backproj.AdamHyper (decoupled: AdamW's W(1 − lr·wd); else Adam's L2 g + wd·W;
    bias corrections for step t; `first`: m = v = 0 before the step), as written in torch.optim.
    The torch backend of subspace_backproj_step_ (it forms the p × d gradient).
    """
    c = compute_dtype
    g = (u.to(c) @ s.to(c)) @ v.to(c).T
    wf = w.to(c)
    lr, wd = hyper.lr, hyper.weight_decay
    if hasattr(hyper, "momentum"):  # SGD
        g = g + wd * wf if wd else g
        m_new = None
        if hyper.momentum != 0:
            m_new = g.clone() if first else hyper.momentum * m.to(c) + (1 - hyper.dampening) * g
            g = g + hyper.momentum * m_new if hyper.nesterov else m_new
        return wf - lr * g, m_new, None
    b1, b2 = hyper.beta1, hyper.beta2
    if hyper.decoupled:
        wf = wf * (1 - lr * wd)
    elif wd:
        g = g + wd * wf
    m0 = torch.zeros_like(g) if first else m.to(c)
    q0 = torch.zeros_like(g) if first else q.to(c)
    m_new = b1 * m0 + (1 - b1) * g
    q_new = b2 * q0 + (1 - b2) * g * g
    denom = torch.sqrt(q_new) / math.sqrt(1 - b2 ** t) + hyper.eps
    return wf - (lr / (1 - b1 ** t)) * m_new / denom, m_new, q_new
