"""Denoise the released (noisy, averaged) gradients of a model's weight matrices by singular-value
shrinkage. Pure post-processing: the inputs are the released gradient and the public noise std only.

`denoise_matrices_` works on a list of 2-D tensors in place; `RMTDenoiser` is the engine hook
(`make_private(..., grad_postprocessors=[RMTDenoiser()])`): postprocess(grads, noise_std) -> None.
"""
from __future__ import annotations

import math
import zlib
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import torch

from dpkern.denoise.rsvd import ORTHS, adaptive_svd, exact_svd
from dpkern.denoise.shrinkers import SHRINKERS, bulk_edge, shrink

METHODS = ("randomized", "exact")


def _check_noise_std(noise_std) -> float:
    try:
        s = float(noise_std)
    except (TypeError, ValueError):
        raise ValueError(f"noise_std must be a number, got {noise_std!r}") from None
    if not (math.isfinite(s) and s >= 0.0):
        raise ValueError(f"noise_std must be finite and >= 0, got {noise_std!r}")
    return s


def denoise_matrices_(mats: Sequence[torch.Tensor], noise_std: float, *, shrinker: str = "frobenius",
                      kappa: float = 1.0, norm_correction: bool = False, max_norm_gain: float = 10.0,
                      method: str = "randomized", rank: int = 8, oversample: int = 16,
                      n_iter: int = 5, max_rank: int | None = None, orth: str = "cholqr2",
                      generators: Sequence[torch.Generator] | None = None,
                      max_batch_numel: int = 1 << 28,
                      warm_start: Sequence[torch.Tensor | None] | None = None,
                      tol: float | None = 0.05, min_iter: int = 1, carry: int = 4,
                      info: dict | None = None) -> list[int]:
    """Replace each noisy matrix G~ (m, n) by U diag(eta(s)) V^T, in place. Returns the ranks kept.

    Matrices of equal shape up to transposition (e.g. (5504, 2048) and (2048, 5504)) on the same
    device are stacked, in chunks of at most `max_batch_numel` elements, and decomposed together.

    Args:
        mats: 2-D float tensors (fp32 / bf16 / fp16; work is in fp32), overwritten.
        noise_std: sigma_e, the std of the Gaussian noise in each entry (sigma * C / B_expected).
            0 means nothing to remove: the matrices are left as they are.
        shrinker: one of SHRINKERS; kappa: threshold multiplier of the bulk edge.
        norm_correction: rescale ||G-hat||_F to sqrt(max(||G~||_F^2 - m n sigma_e^2, 0)) (the
            unbiased estimate of ||G||_F), by a factor of at most `max_norm_gain`. Our own rule.
        method: "randomized" (adaptive subspace iteration) or "exact" (torch.linalg.svd).
        rank, oversample, n_iter, max_rank, orth: see rsvd.adaptive_svd.
        generators: one per matrix for the random sketches (reproducible, batching-invariant).
        warm_start: per matrix, None or a (max(m, n), c) block of starting vectors along the
            longer side (the previous step's `info["vectors"]`). A warm matrix starts at rank
            max(rank, c), from these c vectors plus >= oversample random columns, and iterates
            until the convergence test at `tol` passes (at least min_iter, at most n_iter
            iterations); a matrix without one runs the fixed n_iter (the cold behaviour).
        carry: how many vectors beyond the kept ones go into info["vectors"].
        info: dict filled with "vectors" (per matrix, the next call's warm start, or None),
            "passes" (GEMM passes: sum over GEMMs of the matrices they read), "pass_bytes" (bytes
            of the fp32 stacks those GEMMs read), "numel" (elements denoised), "iters", "reruns",
            "exact", "unconverged" (see rsvd.adaptive_svd), "warm" (matrices warm-started).
    Returns:
        list of int: number of singular values kept per matrix.

    Example:
        >>> g = torch.randn(64, 128) * 0.1          # pure noise of std 0.1
        >>> denoise_matrices_([g], 0.1, kappa=1.2)
        [0]
        >>> bool((g == 0).all())
        True
    """
    if shrinker not in SHRINKERS:
        raise ValueError(f"shrinker must be one of {SHRINKERS}, got {shrinker!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if orth not in ORTHS:
        raise ValueError(f"orth must be one of {ORTHS}, got {orth!r}")
    if not (float(max_norm_gain) >= 1.0):
        raise ValueError(f"max_norm_gain must be >= 1, got {max_norm_gain!r}")
    sigma = _check_noise_std(noise_std)
    for i, t in enumerate(mats):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"mats[{i}] must be a 2-D floating tensor, got "
                             f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    if generators is not None and len(generators) != len(mats):
        raise ValueError(f"generators must have one entry per matrix ({len(mats)}), "
                         f"got {len(generators)}")
    if warm_start is not None:
        if len(warm_start) != len(mats):
            raise ValueError(f"warm_start must have one entry per matrix ({len(mats)}), "
                             f"got {len(warm_start)}")
        for i, (t, v) in enumerate(zip(mats, warm_start)):
            if v is not None and (not isinstance(v, torch.Tensor) or v.dim() != 2
                                  or v.shape[0] != max(t.shape) or v.shape[1] < 1):
                raise ValueError(f"warm_start[{i}] must be None or a (max(m, n), c) tensor, c >= 1,"
                                 f" for a matrix of shape {tuple(t.shape)}, got "
                                 f"{tuple(getattr(v, 'shape', ()))}")
    if tol is not None and not (math.isfinite(float(tol)) and float(tol) > 0):
        raise ValueError(f"tol must be None or finite and > 0, got {tol!r}")
    if int(min_iter) < 0 or int(carry) < 0:
        raise ValueError(f"min_iter and carry must be >= 0, got {min_iter!r}, {carry!r}")
    st = {"vectors": [None] * len(mats), "passes": 0, "pass_bytes": 0, "iters": 0, "reruns": 0,
          "exact": 0, "unconverged": 0,
          "warm": 0 if warm_start is None else sum(v is not None for v in warm_start),
          "numel": sum(t.numel() for t in mats) if sigma > 0 else 0}
    if info is not None:
        info.clear()
        info.update(st)
        st = info
    ranks = [0] * len(mats)
    if sigma == 0.0:
        return [min(t.shape) for t in mats]
    groups: dict = defaultdict(list)
    for i, t in enumerate(mats):
        if t.numel():
            groups[(min(t.shape), max(t.shape), t.device)].append(i)
    for (m, n, _), idx in groups.items():
        per_chunk = max(1, max_batch_numel // (m * n))
        for c in range(0, len(idx), per_chunk):
            chunk = idx[c:c + per_chunk]
            svd_kw = dict(rank=rank, oversample=oversample, n_iter=n_iter, max_rank=max_rank,
                          orth=orth, tol=tol, min_iter=int(min_iter), carry=int(carry),
                          generators=None if generators is None else [generators[i] for i in chunk],
                          v0=None if warm_start is None else [warm_start[i] for i in chunk])
            kept, vecs = _denoise_stack([mats[i] for i in chunk], m, n, sigma, shrinker, kappa,
                                        norm_correction, float(max_norm_gain), method, svd_kw, st)
            for j, i in enumerate(chunk):
                ranks[i], st["vectors"][i] = kept[j], vecs[j]
    return ranks


def _denoise_stack(ts, m, n, sigma, shrinker, kappa, norm_correction, max_norm_gain, method,
                   svd_kw, st) -> tuple[list[int], list]:
    """ts: tensors of shape (m, n) or (n, m), m <= n. Stacked as (b, m, n) fp32, written back.
    Returns the ranks kept and the vectors to carry (None on the exact path)."""
    flip = [t.shape[0] != m for t in ts]
    a = torch.stack([(t.mT if f else t).float() for t, f in zip(ts, flip)])   # (b, m, n)
    thr = kappa * bulk_edge(m, n, sigma)
    vecs = [None] * len(ts)
    if method == "exact":
        u, s, vh = exact_svd(a, svd_kw["max_rank"])
        trip = [(u[j], s[j], vh[j]) for j in range(len(ts))]
    else:
        v0 = svd_kw.pop("v0")
        start = [svd_kw["rank"]] * len(ts)
        if v0 is not None:                     # carry the last kept rank as the starting rank
            start = [max(r, v.shape[1]) if v is not None else r for r, v in zip(start, v0)]
        stats: dict = {}
        trip = adaptive_svd(a, thr, **(svd_kw | dict(rank=start)), v0=v0, stats=stats)
        vecs = stats.pop("carry")
        for key in ("passes", "iters", "reruns", "exact", "unconverged"):
            st[key] += stats[key]
        st["pass_bytes"] += stats["passes"] * m * n * 4
    # All shrinkage of the chunk in one call (same m, n), then one host sync for the ranks.
    s_all = torch.cat([s for _, s, _ in trip])
    eta_all = shrink(s_all, sigma, m, n, shrinker, kappa)
    counts = [s.numel() for _, s, _ in trip]
    etas = torch.split(eta_all, counts)
    ranks = [int(c) for c in torch.stack([(e > 0).sum() for e in etas]).tolist()] if trip else []
    if norm_correction:
        fro2 = a.square().sum((-2, -1)).double()                              # (b,)
        target = (fro2 - m * n * sigma**2).clamp_min(0.0).sqrt()
        norms = torch.stack([e.double().norm() for e in etas])               # = ||G-hat||_F
        gains = (target / norms.clamp_min(1e-300)).clamp_max(max_norm_gain).to(eta_all.dtype)
    for j, (t, f, (u, _, vh)) in enumerate(zip(ts, flip, trip)):
        k = ranks[j]                     # shrinkers are monotone: the kept values are a prefix
        if k == 0:
            t.zero_()
            continue
        eta = etas[j][:k] * gains[j] if norm_correction else etas[j][:k]
        # G-hat = U diag(eta) V^T, in t's own layout; an fp32 t is written by the GEMM itself.
        left, right = (vh[:k].mT * eta, u[:, :k].mT) if f else (u[:, :k] * eta, vh[:k])
        if t.dtype == torch.float32 and t.is_contiguous():
            torch.matmul(left, right, out=t)
        else:
            t.copy_(torch.matmul(left, right))
    return ranks, vecs


class RMTDenoiser:
    """Engine post-processor: denoise every 2-D weight-gradient matrix of the released gradient.

    Called as ``denoiser(grads, noise_std)`` with ``grads`` the noisy averaged gradients by
    parameter name and ``noise_std`` = sigma * C / B_expected; modifies ``grads`` in place.

    What is denoised: tensors with 2 dimensions and both dims >= ``min_dim``. Left as released:
    vectors (biases, norm weights: no matrix structure to exploit), tensors of other ranks (conv
    kernels), and every name matched by ``skip`` (substrings, default ``("embed",)``): embedding
    tables are matrices, but their gradient has one row per distinct token in the batch, a high-
    rank, row-sparse signal outside the low-rank model, which the shrinker would mostly zero. Pass
    ``skip=()`` to denoise them too, or build with :meth:`for_model` to skip ``nn.Embedding``
    weights by module type instead of by name.

    Warm start (``warm_start=True``, randomized method): the kept right singular vectors of each
    matrix (plus ``carry`` more) are kept by parameter name and shape and start the next call's
    subspace iteration, which then stops at the convergence test ``tol`` instead of running all
    ``n_iter`` iterations. The vectors are computed from released gradients only (post-processing:
    the privacy guarantee is unchanged). A matrix with no state (first call, new name, other
    shape, after :meth:`reset`) runs the cold path, identical to ``warm_start=False``. The state is
    a starting guess only: whatever it holds (stale, from another run), the fresh random columns
    and the convergence test decide the result. :meth:`state_dict` / :meth:`load_state_dict`
    checkpoint it with the call counter.

    Other arguments: see :func:`denoise_matrices_`. ``seed`` seeds the random sketches (public
    randomness: it plays no part in the privacy guarantee). After each call ``last_ranks`` holds
    the number of singular values kept per denoised name and ``last_stats`` the cost (GEMM passes,
    bytes read, reruns, warm-started and unconverged matrices; see denoise_matrices_'s ``info``).

    Example:
        >>> den = RMTDenoiser(kappa=1.2)
        >>> grads = {"fc.weight": 0.1 * torch.randn(64, 128), "fc.bias": 0.1 * torch.randn(64)}
        >>> den(grads, 0.1)
        >>> den.last_ranks, bool((grads["fc.weight"] == 0).all())
        ({'fc.weight': 0}, True)
    """

    def __init__(self, *, shrinker: str = "frobenius", kappa: float = 1.0,
                 norm_correction: bool = False, max_norm_gain: float = 10.0,
                 method: str = "randomized", rank: int = 8, oversample: int = 16, n_iter: int = 5,
                 max_rank: int | None = None, orth: str = "cholqr2",
                 warm_start: bool = True, tol: float = 0.05, min_iter: int = 1, carry: int = 4,
                 skip: Iterable[str] = ("embed",), skip_names: Iterable[str] = (),
                 min_dim: int = 2, seed: int = 0, max_batch_numel: int = 1 << 28):
        if shrinker not in SHRINKERS:
            raise ValueError(f"shrinker must be one of {SHRINKERS}, got {shrinker!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not (math.isfinite(float(kappa)) and float(kappa) > 0):
            raise ValueError(f"kappa must be finite and > 0, got {kappa!r}")
        if isinstance(skip, str):
            raise ValueError("skip must be an iterable of substrings, not a single string")
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank!r}")
        if not (math.isfinite(float(tol)) and float(tol) > 0):
            raise ValueError(f"tol must be finite and > 0, got {tol!r}")
        if int(min_iter) < 0 or int(carry) < 0:
            raise ValueError(f"min_iter and carry must be >= 0, got {min_iter!r}, {carry!r}")
        self.kwargs = dict(shrinker=shrinker, kappa=float(kappa), norm_correction=bool(norm_correction),
                           max_norm_gain=float(max_norm_gain), method=method, rank=int(rank),
                           oversample=int(oversample), n_iter=int(n_iter), max_rank=max_rank,
                           orth=orth, max_batch_numel=int(max_batch_numel), tol=float(tol),
                           min_iter=int(min_iter), carry=int(carry))
        self.warm_start = bool(warm_start) and method == "randomized"
        self.skip = tuple(s.lower() for s in skip)
        self.skip_names = frozenset(skip_names)
        self.min_dim = int(min_dim)
        self.seed = int(seed)
        self.calls = 0
        self.last_ranks: dict[str, int] = {}
        self.last_stats: dict = {}
        self._state: dict[str, dict] = {}       # name -> {"shape", "v" (max dim, c), "kept"}

    @classmethod
    def for_model(cls, model: torch.nn.Module, **kwargs) -> "RMTDenoiser":
        """Skip the weights of every nn.Embedding in `model` (by parameter name), not by substring."""
        names = {f"{mod_name}.{p_name}" if mod_name else p_name
                 for mod_name, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)
                 for p_name, _ in mod.named_parameters(recurse=False)}
        kwargs.setdefault("skip", ())
        return cls(skip_names=names, **kwargs)

    def selects(self, name: str, t: torch.Tensor | None) -> bool:
        """Whether the gradient `t` of parameter `name` is denoised."""
        if t is None or t.dim() != 2 or min(t.shape) < self.min_dim or name in self.skip_names:
            return False
        low = name.lower()
        return not any(s in low for s in self.skip)

    def _start(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        entry = self._state.get(name)
        if entry is None or tuple(entry["shape"]) != tuple(t.shape):
            return None                                  # new name or new shape: cold
        return entry["v"].to(device=t.device, dtype=torch.float32)

    def __call__(self, grads: Mapping[str, torch.Tensor], noise_std: float) -> None:
        noise_std = _check_noise_std(noise_std)
        names = [k for k, t in grads.items() if self.selects(k, t)]
        call = self.calls
        self.calls += 1
        gens = []
        for k in names:
            g = torch.Generator(device=grads[k].device)
            g.manual_seed(zlib.crc32(f"{self.seed}:{call}:{k}".encode()))
            gens.append(g)
        warm = [self._start(k, grads[k]) for k in names] if self.warm_start else None
        info: dict = {}
        ranks = denoise_matrices_([grads[k] for k in names], noise_std, generators=gens,
                                  warm_start=warm, info=info, **self.kwargs)
        self.last_ranks = dict(zip(names, ranks))
        vectors = info.pop("vectors")
        if self.warm_start and noise_std > 0:
            for k, v, r in zip(names, vectors, ranks):
                if v is None:
                    self._state.pop(k, None)
                else:
                    self._state[k] = {"shape": tuple(grads[k].shape), "v": v, "kept": int(r)}
        info["passes_per_matrix"] = info["passes"] / max(len(names), 1)
        info["sweeps"] = info["pass_bytes"] / max(4 * info["numel"], 1)
        self.last_stats = info

    def reset(self) -> None:
        """Forget the warm-start state: the next call is cold (as with warm_start=False)."""
        self._state = {}

    def state_dict(self) -> dict:
        """{"calls": int, "matrices": {name: {"shape": [rows, cols], "v": (max dim, c), "kept"}}}:
        the call counter (it seeds the sketches) and the warm-start vectors. Derived from released
        gradients only; torch.save / torch.load(weights_only=True) round-trip it."""
        return {"calls": self.calls,
                "matrices": {k: {"shape": list(e["shape"]), "v": e["v"], "kept": e["kept"]}
                             for k, e in self._state.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restores state_dict()'s output; everything is checked before anything changes."""
        if not isinstance(state, Mapping) or set(state) != {"calls", "matrices"}:
            raise ValueError("load_state_dict: expected a dict with keys 'calls' and 'matrices'")
        calls, mats = state["calls"], state["matrices"]
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"load_state_dict: calls must be an int >= 0, got {calls!r}")
        if not isinstance(mats, Mapping):
            raise ValueError("load_state_dict: 'matrices' must be a dict by parameter name")
        new = {}
        for k, e in mats.items():
            ok = isinstance(e, Mapping) and set(e) == {"shape", "v", "kept"}
            shape = tuple(e["shape"]) if ok and isinstance(e["shape"], (list, tuple)) else ()
            ok = ok and len(shape) == 2 and all(isinstance(d, int) and d >= 1 for d in shape)
            v = e["v"] if ok else None
            ok = ok and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 2 \
                and v.shape[0] == max(shape) and v.shape[1] >= 1 and bool(torch.isfinite(v).all())
            ok = ok and isinstance(e["kept"], int) and 0 <= e["kept"] <= min(shape)
            if not ok:
                raise ValueError(f"load_state_dict: bad entry for {k!r} (want shape [rows, cols], "
                                 "v a finite (max(rows, cols), c) float tensor, kept an int)")
            new[k] = {"shape": shape, "v": v.detach().float(), "kept": e["kept"]}
        self.calls, self._state = calls, new

    def __repr__(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return (f"RMTDenoiser({kw}, warm_start={self.warm_start}, skip={self.skip!r}, "
                f"min_dim={self.min_dim})")
