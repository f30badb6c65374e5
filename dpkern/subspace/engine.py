"""DP-SFT stage 2 through the engine: chosen Linear weights are clipped, summed and noised on the
r×r coordinates S = Uᵀ G V of a per-layer subspace; every other private parameter as usual.

    engine = SubspacePrivacyEngine(accountant="prv")
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
        noise_multiplier=σ, max_grad_norm=C, subspace={"encoder.dense": (U, V)})
    ... the ordinary DP loop (engine_README.md) ...

Math and accounting: dpkern/subspace/README.md. Per backward pass (end of the tape):

* projected weight W (p × d), uses (a, g): S_i = (g_i U)ᵀ (a_i V) (B, ru, rv) fp32 by the fused
  kernel; the sample's bound ‖S_i‖ is computed in fp64 from the S_i that are summed (inflated by
  1 + 2^-28 for the fp64 norm and sum), so no kernel-error term is needed;
* full parameters: the engine's norms and release bounds; one flat norm over everything;
* projected sums Σ_i c_i S_i kept in fp64 (ru × rv per layer: memory O(ru·rv + r(p + d))).

At step(): S̃ = (Σ c_i S_i + σC·z) / B_expected with z from the optimizer's NoiseGenerator at the
release's counter step and the weight's global offset (the same z the engine would draw for the
first ru·rv elements of W), then W ← update(W, U S̃ Vᵀ) by the fused back-projection
(dpkern/subspace/backproj.py: SGD with or without momentum, Adam, AdamW; no p × d gradient; states
in the inner optimizer's state dict), or, for anything else (amsgrad, other optimizers,
fused_backprojection = False), W.grad = U S̃ Vᵀ and the inner optimizer's own step. The
accountant is charged as for any DP-SGD step: every released coordinate has sensitivity ≤ C
jointly and noise std σC.
"""
from __future__ import annotations

import math

import torch

from dpkern import engine as _engine_mod
from dpkern.engine import PrivacyEngine, _Clipper, _LastClip
from dpkern.layers import unwrap_model
from dpkern.layers.bounds import release_bounds
from dpkern.layers.uses import (LinearInputs, LinearUse, PerSampleRows, backward_batch_size,
                               batch_size, bookkeep, norms_sq, stacked)
from dpkern.optim.clipping import clip_factors, round_down_f32
from dpkern.optim.dp_optimizer import DPOptimizer
from dpkern.subspace.backproj import backproj_hyper, subspace_backproj_step_grouped_
from dpkern.subspace.ops import subspace_project_grouped

__all__ = ["SubspacePrivacyEngine", "SubspaceDPOptimizer", "check_basis"]

# ‖Ŝ_i‖ in fp64 from fp32 entries (relative error ≤ (r² + 2)·2^-53) and the fp64 sum of B products
# c_i Ŝ_i (exact products; each term perturbed by ≤ γ_B ≤ 2^-32 for B ≤ 2^20): 2^-28 covers both.
_S_MARGIN = 1.0 + 2.0 ** -28
_ORTHO_TOL = 1e-4


def check_basis(name: str, weight: torch.Tensor, u, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate bases of a (p × d) weight: u (p, ru), v (d, rv) with orthonormal columns, finite,
    1 ≤ ru ≤ p, 1 ≤ rv ≤ d. Returns fp32 contiguous copies on the weight's device."""
    if weight.dim() != 2:
        raise ValueError(f"subspace[{name!r}]: only 2-D weights can be projected, got shape "
                         f"{tuple(weight.shape)}")
    p, d = weight.shape
    out = []
    for nm, x, rows in (("U", u, p), ("V", v, d)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise TypeError(f"subspace[{name!r}]: {nm} must be a 2-D float tensor")
        if x.shape[0] != rows or not 1 <= x.shape[1] <= rows:
            raise ValueError(f"subspace[{name!r}]: {nm} must be ({rows}, r) with 1 <= r <= {rows} "
                             f"for weight {tuple(weight.shape)}, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"subspace[{name!r}]: {nm} has non-finite entries")
        x = x.detach().to(device=weight.device, dtype=torch.float32).contiguous()
        gram = x.double().T @ x.double()
        err = (gram - torch.eye(x.shape[1], dtype=torch.float64, device=x.device)).abs().max()
        if float(err) > _ORTHO_TOL:
            raise ValueError(f"subspace[{name!r}]: {nm} must have orthonormal columns (max |{nm}ᵀ"
                             f"{nm} - I| = {float(err):.2e}); use dpkern.subspace.orthonormalize")
        out.append(x)
    return out[0], out[1]


def _rank_groups(params, bases: dict) -> dict:
    """{(ru, rv, device): [params]} in order of first appearance: the projected layers that share
    one buffer (and a few launches) in the backward and in the release."""
    groups: dict = {}
    for p in params:
        u, v = bases[p]
        groups.setdefault((u.shape[1], v.shape[1], u.device), []).append(p)
    return groups


def _project_groups(proj: dict, sub: list, uses: dict, names: dict, backend) -> list:
    """Per-sample coordinates of the projected weights, layers of one (ru, rv) and device in one
    buffer: [(params, S (L, B, ru, rv) fp32, N̂² (L, B) fp32)], in order of first appearance.
    One projection launch per layout of the group (subspace_project_grouped) and one reduce."""
    for p in sub:
        lin = uses[p]
        if not all(isinstance(u, LinearUse) for u in lin):
            raise RuntimeError(f"projected weight {names[p]!r} has a non-Linear use "
                               f"({', '.join(u.path for u in lin)}): only Linear / Conv1D "
                               "weights can be projected")
    out = []
    for (ru, rv, dev), ps in _rank_groups(sub, proj).items():
        bsz = batch_size(uses[ps[0]][0])
        s_all = torch.empty(len(ps), bsz, ru, rv, dtype=torch.float32, device=dev)
        n_all = torch.empty(len(ps), bsz, dtype=torch.float32, device=dev)
        layers = []
        for p in ps:
            lin = uses[p]
            a = lin[0].a if len(lin) == 1 else torch.cat([u.a for u in lin], dim=1)
            g = lin[0].g if len(lin) == 1 else torch.cat([u.g for u in lin], dim=1)
            layers.append((a, g) + proj[p])
        subspace_project_grouped(layers, (s_all, n_all), backend=backend)
        out.append((ps, s_all, n_all))
    return out


class _SubspaceClipper(_Clipper):
    """_Clipper with projected weights: their per-sample contribution is S_i on the r×r coordinates.
    No host-GPU synchronisation (as the engine's flush): the count of non-finite samples stays on
    the device until read, and the projected layers' norms, bounds and sums run per group of equal
    rank (a handful of launches per group, not per layer)."""

    def __call__(self, uses: dict) -> None:
        opt = self.optimizer
        proj = getattr(opt, "bases", {})
        if not proj:
            return super().__call__(uses)
        params = [p for p in self.private if p in uses]
        bsz = backward_batch_size(uses, params)
        if bsz == 0:
            opt.note_backward(0)
            return
        refuse = getattr(_engine_mod, "_refuse_low_precision_mean", None)
        if self.loss_reduction == "mean" and refuse is not None:
            refuse(uses, params)
        s = float(bsz) if self.loss_reduction == "mean" else 1.0
        full = [p for p in params if p not in proj]
        sub = [p for p in params if p in proj]
        # norm weights and biases this optimizer releases: bounds and sums per width, as the engine
        rows = PerSampleRows(uses, [p for p in full if p in opt.params])
        linear = LinearInputs(uses, full)  # read by the norms and by the bounds' sums
        n_full = norms_sq(uses, full, backend=self.backend, linear=linear) if full else []
        b_full = (release_bounds(uses, full, n_full, backend=self.backend, rows=rows,
                                 linear=linear) if full else [])
        linear = None
        if s != 1.0:
            b_full = [u * s for u in b_full]
        by_p = dict(zip(full, zip(n_full, b_full)))
        groups = _project_groups(proj, sub, uses, self.private, self.backend)
        coords = []
        for ps, s_all, n_all in groups:
            s64 = s_all.double()  # (L, B, ru, rv): the bound is the fp64 norm of what is summed
            nrm = torch.linalg.vector_norm(s64, dim=(2, 3)) * (_S_MARGIN * s)
            nrm = torch.where(torch.isfinite(nrm), nrm, math.inf)
            coords.append(s64)
            by_p.update(zip(ps, zip(n_all.unbind(0), nrm.unbind(0))))
        bounds = [by_p[p][1] for p in params]
        per_param = [self.per_param[p] for p in params] if self.per_param else None
        factors, finite = clip_factors(bounds, self.clipping, self.max_grad_norm, per_param,
                                       self.gamma)
        n_bad = bsz - finite.sum()  # stays on the device until read (no host sync)
        opt.last_clip = _LastClip({self.private[p]: by_p[p] for p in params}, s * s)
        scales, opt.last_scales = {}, {}
        factor_of = dict(zip(params, factors))
        for p, c in zip(params, factors):
            sc = scales.get(id(c))
            if sc is None:  # c·s rounded down: the factor applied keeps c U ≤ C
                sc = scales[id(c)] = round_down_f32(c * s)
            opt.last_scales[self.private[p]] = sc
        for (ps, _, _), s64 in zip(groups, coords):  # ps ⊆ proj = opt.bases
            for p in ps:
                uses.pop(p)
            sc = stacked([scales[id(factor_of[p])] for p in ps], torch.float64)  # (L, B)
            # a non-finite sample has factor 0, and 0·NaN = NaN: its coordinates are zeroed first
            s64 = torch.where(finite.view(1, -1, 1, 1), s64, 0.0)
            opt.add_sub_sums(ps, torch.einsum("lb,lbrs->lrs", sc, s64))  # fp64 (L, ru, rv)
        row_scales = {}  # parameters held in `rows`: book-kept per width
        for p, c in zip(params, factors):
            if p in proj:
                continue
            p_uses = uses.pop(p)
            if p not in opt.params:
                continue
            if p in rows:
                row_scales[p] = scales[id(c)]
                continue
            # as the engine: book-keeping gives a scale-0 Linear sample nothing; other uses are
            # zeroed (0·NaN = NaN), always, so the control flow does not depend on the data
            p_uses = [u if isinstance(u, LinearUse) else u.zero_samples(finite) for u in p_uses]
            acc = opt.summed.get(p)
            if acc is None and not isinstance(p_uses[0], LinearUse):
                acc = opt.accumulator(p)
            opt.summed[p] = bookkeep(p_uses, scales[id(c)], acc, backend=self.backend)
        self._bookkeep_rows(rows, row_scales, finite)
        opt.note_backward(bsz, n_bad)


class SubspaceDPOptimizer(DPOptimizer):
    """DPOptimizer whose projected weights (`bases`: {param: (U, V)}) are released on their r×r
    coordinates. Same arguments as DPOptimizer; bases are set by SubspacePrivacyEngine.

    Attributes:
        bases: {param: (U (p, ru), V (d, rv))} fp32, orthonormal columns.
        last_released: {name: S̃ (ru, rv) fp32}, the noisy averaged coordinates of the last step.
        fused_backprojection: True (default): SGD (any momentum), Adam and AdamW update projected
            weights by the fused back-projection (no p × d gradient; p.grad stays None);
            False, or amsgrad / maximize / another optimizer: W.grad = U S̃ Vᵀ, inner step.
        backproj_backend: backend of the fused back-projection (None: DPKERN_BACKEND / auto).
        last_backproj: True when the last step used the fused back-projection.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bases: dict = {}
        self.sub_summed: dict = {}
        # {ids of a rank group's params: (sums (L, ru, rv), its rows)}: the buffer whose rows are
        # sub_summed's entries, so the release adds into and reads it whole (no stack per step)
        self._sub_stacks: dict = {}
        self.last_released: dict = {}
        self.fused_backprojection = True
        self.backproj_backend: str | None = None
        self.last_backproj = False
        self._projected: dict = {}  # param -> name, projected parameters removed from self.params
        self._sub_grads: dict = {}
        # Run at the very end of step(), after the projected weights moved (refreshers).
        self.post_step_hooks: list = []

    def add_sub_sums(self, ps: list, sums: torch.Tensor) -> None:
        """Add one backward pass's Σ_i c_i S_i of the projected weights ps (sums (L, ru, rv)
        fp64, row k for ps[k]) to sub_summed: the first pass keeps `sums` (its rows are the
        entries), a later one adds into it with one launch."""
        key = tuple(id(p) for p in ps)
        prev = self._sub_stacks.get(key)
        if prev is not None and all(self.sub_summed.get(p) is x for p, x in zip(ps, prev[1])):
            prev[0].add_(sums)
            return
        rows = sums.unbind(0)
        old = [k for k, p in enumerate(ps) if p in self.sub_summed]
        if old:  # another grouping than the last pass's: one multi-tensor add
            torch._foreach_add_([self.sub_summed[ps[k]] for k in old], [rows[k] for k in old])
        for p, x in zip(ps, rows):
            self.sub_summed.setdefault(p, x)
        if not old:
            self._sub_stacks[key] = (sums, rows)

    def _sub_sums(self, ps: list, ru: int, rv: int, dev) -> torch.Tensor:
        """(L, ru, rv) fp64: sub_summed of ps stacked (zeros where none), the buffer itself when
        its rows are the entries."""
        hit = self._sub_stacks.get(tuple(id(p) for p in ps))
        if hit is not None and all(self.sub_summed.get(p) is x for p, x in zip(ps, hit[1])):
            return hit[0]
        return torch.stack([self.sub_summed[p] if p in self.sub_summed else
                            torch.zeros(ru, rv, dtype=torch.float64, device=dev) for p in ps])

    def set_bases(self, bases: dict) -> None:
        """{param: (U, V)}: project these private weights from the next backward on (between steps
        only). Parameters dropped from the mapping go back to the full release."""
        if self.sub_summed or self.backwards:
            raise RuntimeError("set_bases: call it between steps (a backward pass is pending)")
        names = dict(self.params) | self._projected
        new = {}
        for p, (u, v) in bases.items():
            if p not in names:
                raise ValueError("subspace: a parameter is not a private parameter of this "
                                 "optimizer")
            new[p] = check_basis(names[p], p, u, v)
        from collections import OrderedDict
        self.params = OrderedDict((p, n) for p, n in names.items() if p not in new)
        # keep model order for the projected ones too
        order = list(self.global_offsets)
        self._projected = {p: names[p] for p in order if p in new}
        self.bases = {p: new[p] for p in self._projected}

    def _check_projected_grads(self) -> None:
        for p, name in self._projected.items():
            g = p.grad
            mine = self._sub_grads.get(p)
            if g is not None and (mine is None or mine[0] is not g or mine[1] != g._version):
                raise RuntimeError(f"gradients found from outside the engine on parameter "
                                   f"{name!r} (projected): that gradient was never clipped")

    def _backproj_hypers(self) -> dict | None:
        """{id(group): SGDHyper | AdamHyper} for the fused back-projection of the projected weights,
        or None when it cannot run (then W.grad is materialised for the inner step)."""
        if not self.fused_backprojection:
            return None
        if not all(p.dtype in (torch.float32, torch.bfloat16) and p.is_contiguous()
                   for p in self._projected):
            return None
        mine = set(self._projected)
        try:
            return {id(g): backproj_hyper(self.original_optimizer, g) for g in self.param_groups
                    if any(p in mine for p in g["params"])}
        except NotImplementedError:  # amsgrad, maximize, other optimizers: torch's own step
            return None

    def _states_for_torch(self) -> None:
        """Before an inner torch step on projected weights: fused steps keep fp32 states (as
        DPOptimizer's fused step); torch.optim wants a bf16 weight's states in bf16."""
        for p in self._projected:
            st = self.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                x = st.get(k)
                if isinstance(x, torch.Tensor) and x.dtype != p.dtype:
                    st[k] = x.to(p.dtype)

    @torch.no_grad()
    def _released_coords(self, step: int) -> dict:
        std = self.noise_multiplier * self.max_grad_norm
        # as DPOptimizer.step: "mean", or "sum" with average_sum, divide by B_expected
        norm = (self.expected_batch_size
                if self.loss_reduction == "mean" or getattr(self, "average_sum", False) else 1)
        from dpkern.mechanisms.noise_ops import gaussian_noise_segments
        out = {}
        for (ru, rv, dev), ps in _rank_groups(self._projected, self.bases).items():
            acc = self._sub_sums(ps, ru, rv, dev)
            if std > 0:  # layer k's z: the normals at its weight's global offset (one launch)
                z = gaussian_noise_segments(ru * rv, [int(self.global_offsets[p]) for p in ps],
                                            std=std, words=self.noise_generator.kernel_words(step),
                                            device=dev, backend=self.noise_backend)
                acc = acc + z.double().view(len(ps), ru, rv)
            released = (acc / norm).float()
            out.update(zip(ps, released.unbind(0)))
        return {p: out[p] for p in self._projected}

    def step(self, closure=None):
        if not self._projected:
            loss = super().step(closure)
            for hook in self.post_step_hooks:
                hook(self)
            return loss
        self._check_projected_grads()
        step = self.noise_generator.step  # the counter step super().step() is about to reserve
        released = self._released_coords(step)
        hypers = self._backproj_hypers()
        fused = self.fused_update_available()  # super() then runs no torch optimizer step
        if hypers is None:
            self._states_for_torch()
        if hypers is None and not fused:  # the inner optimizer's one step sees these grads
            for p, s_t in released.items():
                u, v = self.bases[p]
                p.grad = (u @ s_t @ v.T).to(p.dtype)
        try:
            loss = super().step(closure)
        except Exception:
            for p in self._projected:
                p.grad = None
            raise
        if self.noise_generator.step != step + 1:
            raise RuntimeError("SubspaceDPOptimizer: the noise counter moved unexpectedly")
        self.last_released = {self._projected[p]: s for p, s in released.items()}
        self.last_backproj = hypers is not None
        with torch.no_grad():
            if hypers is not None:  # super() stepped the full parameters only
                # one grouped back-projection per param group: a launch per layout and step count
                mine = [(g, [p for p in g["params"] if p in released]) for g in self.param_groups]
                for grp, ps in mine:
                    if not ps:
                        continue
                    sts = [self.state[p] for p in ps]
                    subspace_backproj_step_grouped_(
                        ps, [self.bases[p][0] for p in ps], [released[p] for p in ps],
                        [self.bases[p][1] for p in ps], hypers[id(grp)], sts,
                        backend=self.backproj_backend)
                    for p, st in zip(ps, sts):
                        step_t = st.get("step")
                        if ((grp.get("fused") or grp.get("capturable"))
                                and isinstance(step_t, torch.Tensor)
                                and step_t.device != p.device):
                            st["step"] = step_t.to(p.device)  # where torch's fused Adam keeps it
                        p.grad = None
            elif fused:  # super() ran the fused kernel on the full parameters only
                for p, s_t in released.items():
                    u, v = self.bases[p]
                    p.grad = (u @ s_t @ v.T).to(p.dtype)
                self.original_optimizer.step()  # only projected params hold a grad now
        self._sub_grads = {p: (p.grad, p.grad._version) for p in self._projected
                           if p.grad is not None}
        self.sub_summed, self._sub_stacks = {}, {}
        for hook in self.post_step_hooks:
            hook(self)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self._projected:
            p.grad = None
        self.sub_summed, self._sub_grads, self._sub_stacks = {}, {}, {}


class SubspacePrivacyEngine(PrivacyEngine):
    """PrivacyEngine with DP-SFT projected layers (`subspace=` in make_private).

    Stages share this engine's accountant: run stage 1 (plain DP-SGD, make_private without
    subspace), `finish_stage(model)`, then make_private again with the bases; get_epsilon()
    composes both stages (README.md here).
    """

    clipper_class = _SubspaceClipper
    optimizer_class = SubspaceDPOptimizer

    def make_private(self, *, module: torch.nn.Module, subspace: dict | None = None, **kwargs):
        """PrivacyEngine.make_private plus `subspace`: {layer path | weight name | weight
        parameter: (U (p, ru), V (d, rv))} for Linear / Conv1D weights W (p × d) (Conv1D: W is
        stored (d_in, d_out); give U for its rows and V for its columns). Returns the same triple.
        """
        if subspace and kwargs.get("mechanism") is not None:
            raise ValueError("subspace: projected layers support the Gaussian mechanism only")
        if subspace is not None and not isinstance(subspace, dict):
            raise TypeError(f"subspace must be a dict {{layer: (U, V)}}, got {type(subspace).__name__}")
        resolved = self._resolve(module, subspace or {})  # before wrapping: refuse early
        module, opt, loader = super().make_private(module=module, **kwargs)
        if resolved:
            opt.set_bases(resolved)
        return module, opt, loader

    def set_subspace(self, subspace: dict, module: torch.nn.Module | None = None) -> None:
        """Replace the bases between steps (refresh); keys as in make_private."""
        opt = self.optimizer
        if not isinstance(opt, SubspaceDPOptimizer):
            raise RuntimeError("set_subspace: call make_private first")
        names = {n: p for p, n in (dict(opt.params) | opt._projected).items()}
        opt.set_bases(self._resolve(module, subspace, names))

    def finish_stage(self, module: torch.nn.Module) -> None:
        """End a stage: unwrap the model (it can be made private again); the accountant keeps
        every step already taken."""
        unwrap_model(module)

    @staticmethod
    def _resolve(module, subspace: dict, names: dict | None = None) -> dict:
        out = {}
        for key, uv in subspace.items():
            if not (isinstance(uv, (tuple, list)) and len(uv) == 2):
                raise TypeError(f"subspace[{key!r}] must be a pair (U, V)")
            if isinstance(key, torch.nn.Parameter):
                p = key
            elif isinstance(key, str):
                p = (names or {}).get(key) or (names or {}).get(key + ".weight")
                if p is None and module is not None:
                    try:
                        p = module.get_parameter(key)
                    except AttributeError:
                        try:
                            p = module.get_submodule(key).weight
                        except AttributeError:
                            p = None
                if p is None:
                    raise ValueError(f"subspace: {key!r} is not a layer or weight of the model")
            else:
                raise TypeError(f"subspace: keys are layer paths or parameters, got {type(key)}")
            if not p.requires_grad:
                raise ValueError(f"subspace[{key!r}]: the weight is frozen (not private)")
            check_basis(str(key), p, *uv)
            out[p] = uv
        return out
