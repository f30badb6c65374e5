"""Where the bases come from (README.md here, "Subspace sources").

* public: `public_gradient_bases` (gradients of a public loss; no privacy cost), or U, V given;
* private stage 1: `TrajectoryTracker` over a model trained by the engine (DP-SGD, charged to the
  same accountant): Θ(j) − Θ(0) per layer, the paper's trajectory, one layer at a time;
* refresh: `SubspaceRefresher`, the same tracker during stage 2 (the weights are released
  outputs: post-processing, free), re-basing every N steps.

Per layer we keep a randomized range sketch of the stacked matrices instead of the matrices:
Y_U = Σ_j M_j Ω_j (p × l) and Y_V = Σ_j M_jᵀ Ψ_j (d × l), l = r + oversample, with independent
Gaussian test matrices; Y_U is a Gaussian sketch of the horizontal stack [M_1 … M_k], Y_V of the
vertical one, so U / V = top-r left singular vectors of Y_U / Y_V. Memory O(l (p + d)) per layer,
whatever the number of snapshots. The test matrices are data-independent and public (a fixed
seed is fine: they carry no privacy). `exact=True` keeps the matrices and uses their exact SVD
(small layers, tests).
"""
from __future__ import annotations

import torch

__all__ = ["orthonormalize", "LowRankSketch", "TrajectoryTracker", "public_gradient_bases",
           "SubspaceRefresher"]


def orthonormalize(m: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """Top-`rank` left singular vectors of m (n, k) -> (n, rank) fp32 with orthonormal columns
    (rank defaults to k; columns beyond the numerical rank are still orthonormal)."""
    if m.dim() != 2:
        raise ValueError(f"orthonormalize: m must be 2-D, got shape {tuple(m.shape)}")
    rank = m.shape[1] if rank is None else int(rank)
    if not 1 <= rank <= m.shape[0]:
        raise ValueError(f"orthonormalize: rank must be in [1, {m.shape[0]}], got {rank}")
    u, _, _ = torch.linalg.svd(m.double(), full_matrices=False)
    if u.shape[1] < rank:  # fewer columns than asked: complete with an orthonormal complement
        q, _ = torch.linalg.qr(torch.cat([u, torch.eye(m.shape[0], dtype=u.dtype,
                                                       device=u.device)], dim=1))
        u = q
    return u[:, :rank].float().contiguous()


class LowRankSketch:
    """Sketch of a sequence of (p × d) matrices for their common top-r row and column spaces.

    Args:
        shape: (p, d). rank: r. oversample: extra sketch columns. exact: keep the matrices.
        seed: seed of the (public) Gaussian test matrices.
    """

    def __init__(self, shape, rank: int, *, oversample: int = 8, exact: bool = False,
                 seed: int = 0, device=None):
        self.p, self.d = (int(s) for s in shape)
        if not 1 <= int(rank) <= min(self.p, self.d):
            raise ValueError(f"rank must be in [1, {min(self.p, self.d)}] for shape {tuple(shape)}, "
                             f"got {rank}")
        self.rank, self.exact = int(rank), bool(exact)
        self.l = min(self.rank + int(oversample), self.p, self.d)
        self.count = 0
        self._gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self._mats: list = []
        self.y_u = self.y_v = None
        self.device = device

    def add(self, m: torch.Tensor) -> None:
        if tuple(m.shape) != (self.p, self.d):
            raise ValueError(f"LowRankSketch.add: expected ({self.p}, {self.d}), got {tuple(m.shape)}")
        m = m.detach().float()
        self.count += 1
        if self.exact:
            self._mats.append(m.clone())
            return
        om = torch.randn(self.d, self.l, generator=self._gen).to(m.device)
        ps = torch.randn(self.p, self.l, generator=self._gen).to(m.device)
        yu, yv = m @ om, m.T @ ps
        self.y_u = yu if self.y_u is None else self.y_u.add_(yu)
        self.y_v = yv if self.y_v is None else self.y_v.add_(yv)

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (p, r), V (d, r)) fp32, orthonormal columns."""
        if self.count == 0:
            raise RuntimeError("LowRankSketch.bases: no matrix was added")
        if self.exact:
            return (orthonormalize(torch.cat(self._mats, dim=1), self.rank),
                    orthonormalize(torch.cat([m.T for m in self._mats], dim=1), self.rank))
        return orthonormalize(self.y_u, self.rank), orthonormalize(self.y_v, self.rank)


def _weights(model: torch.nn.Module, layers) -> dict:
    out = {}
    for name in layers:
        try:
            w = model.get_parameter(name)
        except AttributeError:
            w = model.get_submodule(name).weight
        if w.dim() != 2:
            raise ValueError(f"layer {name!r}: weight must be 2-D, got {tuple(w.shape)}")
        out[name] = w
    return out


class TrajectoryTracker:
    """Snapshots W(j) − W(0) of chosen layers every `every` calls to update() into per-layer
    sketches; bases() gives {layer: (U, V)}. Only what the model already released is read.

    Args:
        model: the (private) model being trained. layers: layer paths or weight names.
        rank: r per layer (an int, or {layer: r}). every: snapshot period in steps.
    """

    def __init__(self, model, layers, rank, *, every: int = 1, oversample: int = 8,
                 exact: bool = False, seed: int = 0):
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.w = _weights(model, layers)
        self.w0 = {n: w.detach().float().clone() for n, w in self.w.items()}
        ranks = rank if isinstance(rank, dict) else {n: rank for n in self.w}
        self.sketch = {n: LowRankSketch(w.shape, ranks[n], oversample=oversample, exact=exact,
                                        seed=seed + i) for i, (n, w) in enumerate(self.w.items())}
        self.every, self.calls = int(every), 0

    @torch.no_grad()
    def update(self) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            for n, w in self.w.items():
                self.sketch[n].add(w.detach().float() - self.w0[n])

    def bases(self) -> dict:
        return {n: s.bases() for n, s in self.sketch.items()}


def public_gradient_bases(model, batches, loss_fn, layers, rank, *, oversample: int = 8,
                          exact: bool = False, seed: int = 0) -> dict:
    """Bases from gradients on PUBLIC data (no privacy cost): for each public batch, the gradient
    of loss_fn(model, batch) (a scalar) w.r.t. each layer's weight enters the sketch.

    The model must not be private (call before make_private, or on a copy). Returns
    {layer: (U (p, r), V (d, r))}.
    """
    if getattr(model, "_dpkern_root", None) is not None or any(
            "_dpkern_site" in m.__dict__ for m in model.modules()):
        raise RuntimeError("public_gradient_bases: the model is private (wrapped); use the plain "
                           "model or a deepcopy of it")
    w = _weights(model, layers)
    ranks = rank if isinstance(rank, dict) else {n: rank for n in w}
    sk = {n: LowRankSketch(x.shape, ranks[n], oversample=oversample, exact=exact, seed=seed + i)
          for i, (n, x) in enumerate(w.items())}
    names = list(w)
    for batch in batches:
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, [w[n] for n in names])
        for n, g in zip(names, grads):
            sk[n].add(g)
    return {n: s.bases() for n, s in sk.items()}


class SubspaceRefresher:
    """Every `every` steps, replace the engine's bases by those of the trajectory since the last
    refresh (post-processing of released weights: no privacy cost). Registers itself as a
    post-step hook of the engine's optimizer.

    For projected layers the released updates lie in span(U)·span(V)ᵀ, so a refresh can only
    re-rank / rotate within the current subspace (useful with a smaller rank, or for layers
    released in full that are then projected); it cannot discover new directions by itself.
    """

    def __init__(self, engine, model, layers, rank, *, every: int, **sketch_kwargs):
        self.engine, self.model, self.layers, self.rank = engine, model, list(layers), rank
        self.every, self.kw, self.refreshes = int(every), sketch_kwargs, 0
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self._new()
        opt = engine.optimizer
        getattr(opt, "post_step_hooks", opt.step_hooks).append(self._hook)

    def _new(self):
        self.tracker = TrajectoryTracker(self.model, self.layers, self.rank, **self.kw)

    def _hook(self, opt) -> None:
        self.tracker.update()
        if self.tracker.calls % self.every == 0:
            self.engine.set_subspace(self.tracker.bases(), self.model)
            self.refreshes += 1
            self._new()
