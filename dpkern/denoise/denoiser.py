"""Denoise the released (noisy, averaged) gradients of a model's weight matrices by singular-value
shrinkage. Pure post-processing: the inputs are the released gradient and the public noise std only.

`denoise_matrices_` works on a list of 2-D tensors in place; `RMTDenoiser` is the engine hook
(`make_private(..., grad_postprocessors=[RMTDenoiser()])`): postprocess(grads, noise_std) -> None.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from collections import defaultdict
from typing import Iterable, Mapping, MutableMapping, Sequence

import torch

from dpkern.denoise.rsvd import (ORTHS, _per_row, adaptive_svd, adaptive_svd_stacks, as_batch,
                                 exact_svd, warm_svd, warm_svd_stacks)
from dpkern.denoise.shrinkers import SHRINKERS, bulk_edge, shrink, shrink_dims, shrink_rows
from dpkern._matmul import fp32_matmul

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
                      warm_passes: int | None = 4, resync: bool = False,
                      info: dict | None = None) -> list[int]:
    """Replace each noisy matrix G~ (m, n) by U diag(eta(s)) V^T, in place. Returns the ranks kept
    (reading them back is this function's one host sync on the warm path; `RMTDenoiser` avoids
    it).

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
            longer side (the previous step's `info["vectors"]`). A stack (chunk) whose matrices
            all have one runs rsvd.warm_svd: width k = max(rank, c) over the stack, l = k +
            oversample columns (>= oversample of them random), exactly `warm_passes` GEMM passes,
            no rerun, no host sync; info["vectors"] is then each matrix's top k. A matrix
            without one runs the fixed n_iter (the cold behaviour) with the rest of its stack.
        warm_passes: the warm pass count, fixed on the host. None: the former adaptive warm
            path (convergence test at `tol` after at least `min_iter` iterations, at most
            n_iter; a host sync and a small SVD per pass).
        resync: run warm stacks through rsvd.adaptive_svd (warm_passes passes, then a rerun at
            twice the rank for a matrix whose kth value is above the threshold; a host sync per
            round): the carried block becomes the kept vectors + `carry`. Synchronous stacks
            (cold, resync) of one device run batched (rsvd.adaptive_svd_stacks) unless
            warm_passes=None with a warm start (the adaptive path) or method="exact".
        carry: how many vectors beyond the kept ones go into info["vectors"] (synchronous paths).
        info: dict filled with "vectors" (per matrix, the next call's warm start, or None),
            "passes" (GEMM passes: sum over GEMMs of the matrices they read), "pass_bytes" (bytes
            of the fp32 stacks those GEMMs read), "numel" (elements denoised), "iters", "reruns",
            "exact", "unconverged" (see rsvd.adaptive_svd), "warm" (matrices warm-started),
            "saturated" (warm_svd matrices whose kth value was above the threshold; a 0-d device
            tensor once a warm stack ran: reading it is a host sync), "counts" (per chunk,
            (matrix indices, device tensor of the ranks kept)).
    Returns:
        list of int: number of singular values kept per matrix.

    Example:
        >>> g = torch.randn(64, 128) * 0.1          # pure noise of std 0.1
        >>> denoise_matrices_([g], 0.1, kappa=1.2)
        [0]
        >>> bool((g == 0).all())
        True
    """
    st: dict = {} if info is None else info
    _denoise_all(mats, noise_std, shrinker=shrinker, kappa=kappa,
                 norm_correction=norm_correction, max_norm_gain=max_norm_gain, method=method,
                 rank=rank, oversample=oversample, n_iter=n_iter, max_rank=max_rank, orth=orth,
                 generators=generators, max_batch_numel=max_batch_numel, warm_start=warm_start,
                 tol=tol, min_iter=min_iter, carry=carry, warm_passes=warm_passes,
                 resync=resync, info=st)
    if _check_noise_std(noise_std) == 0.0:
        return [min(t.shape) for t in mats]
    return ranks_of(st["counts"], len(mats))


def _denoise_all(mats: Sequence[torch.Tensor], noise_std: float, *, shrinker: str = "frobenius",
                 kappa: float = 1.0, norm_correction: bool = False, max_norm_gain: float = 10.0,
                 method: str = "randomized", rank: int = 8, oversample: int = 16,
                 n_iter: int = 5, max_rank: int | None = None, orth: str = "cholqr2",
                 generators: Sequence[torch.Generator] | None = None,
                 max_batch_numel: int = 1 << 28,
                 warm_start: Sequence[torch.Tensor | None] | None = None,
                 tol: float | None = 0.05, min_iter: int = 1, carry: int = 4,
                 warm_passes: int | None = 4, resync: bool = False,
                 info: dict | None = None, workspace: dict | None = None,
                 results: list | None = None) -> None:
    """denoise_matrices_ without reading the ranks back: they stay on the device in
    info["counts"]. workspace: a dict the caller keeps across calls (RMTDenoiser does), holding
    the warm path's padded buffers and per-row constants of the last layout per device.
    results: None (every matrix is overwritten), or a list of len(mats) Nones in which the warm
    path may put, for a float32 matrix it had to stack by copying, a new tensor holding its
    result (a view of that stack, written by one GEMM per stack) instead of writing it back
    matrix by matrix; such a matrix is then left as it was."""
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
    if warm_passes is not None and int(warm_passes) < 2:
        raise ValueError(f"warm_passes must be None or >= 2, got {warm_passes!r}")
    st = {"vectors": [None] * len(mats), "passes": 0, "pass_bytes": 0, "iters": 0, "reruns": 0,
          "exact": 0, "unconverged": 0, "saturated": 0, "counts": [],
          "warm": 0 if warm_start is None else sum(v is not None for v in warm_start),
          "numel": sum(t.numel() for t in mats) if sigma > 0 else 0}
    if info is not None:
        info.clear()
        info.update(st)
        st = info
    if sigma == 0.0:
        return
    # Stacks of one exact shape (a (5504, 2048) stack is used as its transpose view, not
    # copied transposed), in chunks of at most max_batch_numel elements.
    groups: dict = defaultdict(list)
    for i, t in enumerate(mats):
        if t.numel():
            groups[(tuple(t.shape), t.device)].append(i)
    warm_batch: dict = defaultdict(list)       # device -> chunks for the batched warm path
    sync_batch: dict = defaultdict(list)       # device -> chunks for the batched cold / resync path
    for (shape, dev), idx in groups.items():
        m, n = min(shape), max(shape)
        per_chunk = max(1, max_batch_numel // (m * n))
        for c in range(0, len(idx), per_chunk):
            chunk = idx[c:c + per_chunk]
            v0 = None if warm_start is None else [warm_start[i] for i in chunk]
            if method == "randomized" and warm_passes is not None and not resync \
                    and v0 is not None and all(v is not None for v in v0) \
                    and min(max([rank] + [v.shape[1] for v in v0]), m) + oversample < m:
                warm_batch[dev].append((chunk, m, n, shape[0] != m))
                continue
            if method == "randomized" and not (warm_passes is None and tol is not None and
                                               v0 is not None and any(v is not None for v in v0)):
                sync_batch[dev].append((chunk, m, n, shape[0] != m))   # fixed passes: batched
                continue
            svd_kw = dict(rank=rank, oversample=oversample, n_iter=n_iter, max_rank=max_rank,
                          orth=orth, tol=tol, min_iter=int(min_iter), carry=int(carry),
                          warm_passes=None if warm_passes is None else int(warm_passes),
                          resync=bool(resync),
                          generators=None if generators is None else [generators[i] for i in chunk],
                          v0=v0)
            counts, vecs = _denoise_stack([mats[i] for i in chunk], m, n, sigma, shrinker, kappa,
                                          norm_correction, float(max_norm_gain), method, svd_kw,
                                          st)
            st["counts"].append((chunk, counts))
            for j, i in enumerate(chunk):
                st["vectors"][i] = vecs[j]
    for dev, chunks in sync_batch.items():
        ws = workspace.setdefault(str(dev), {}) if workspace is not None else None
        _denoise_sync(chunks, mats, warm_start, generators, sigma, shrinker, kappa,
                      norm_correction, float(max_norm_gain),
                      dict(rank=int(rank), oversample=int(oversample), n_iter=int(n_iter),
                           max_rank=max_rank, orth=orth, carry=int(carry),
                           warm_passes=None if warm_passes is None else int(warm_passes)),
                      st, ws)
    for dev, chunks in warm_batch.items():
        ws = workspace.setdefault(str(dev), {}) if workspace is not None else None
        _denoise_warm(chunks, mats, warm_start, generators, sigma, shrinker, kappa,
                      norm_correction, float(max_norm_gain), int(rank), int(oversample),
                      int(warm_passes), orth, st, ws, results)


def _stack(ts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Equal-shape matrices as one fp32 (b, r, c) stack, and whether it is a view of them: it
    is when they already are equally spaced slices of one fp32 storage (no copy), else one
    stacking copy."""
    if ts[0].dtype == torch.float32:
        view = as_batch(ts)
        if view is not None:
            return view, True
    if all(t.dtype == ts[0].dtype for t in ts):
        return torch.stack(ts).float(), False
    return torch.stack([t.float() for t in ts]), False


def _chunk_stacks(chunks, mats, warm_start, generators):
    """The chunks [(matrix indices, m, n, flipped)] as (b, m, n) fp32 stacks (a view of the
    gradients or one stacking copy each), whether each is a view, and their starts, generators
    and (b, m, n) keys."""
    stacks, views, v0, gens, key = [], [], [], [], []
    for chunk, m, n, flip in chunks:
        a, view = _stack([mats[i] for i in chunk])
        stacks.append(a.mT if flip else a)                              # (b, m, n)
        views.append(view)
        v0.append(None if warm_start is None else [warm_start[i] for i in chunk])
        gens.append(None if generators is None else [generators[i] for i in chunk])
        key.append((len(chunk), m, n))
    return stacks, views, v0, gens, key


def _row_consts(key, sigma, kappa, dev, ws):
    """Per-row thresholds (B,) float32 and shrinker dims (B, 2) float64 of the stacks `key`
    [(b, m, n)], filled on the device (no host copy), kept in ws for the next call."""
    consts = None if ws is None else ws.get("consts")
    if consts is None or consts[0] != (tuple(key), sigma, kappa):
        sizes = [b for b, _, _ in key]
        thr = _per_row([kappa * bulk_edge(m, n, sigma) for _, m, n in key], sizes, dev,
                       torch.float32)
        dims = torch.stack([_per_row([shrink_dims(m, n)[c] for _, m, n in key], sizes, dev,
                                     torch.float64) for c in (0, 1)], 1)          # (B, 2)
        consts = ((tuple(key), sigma, kappa), thr, dims)
        if ws is not None:
            ws["consts"] = consts
    return consts[1], consts[2]


def _denoise_sync(chunks, mats, warm_start, generators, sigma, shrinker, kappa, norm_correction,
                  max_norm_gain, kw, st, ws) -> None:
    """The synchronous path (cold matrices, resync calls) for every chunk of one device at once:
    rsvd.adaptive_svd_stacks (per round one set of passes over all stacks, one host sync), then
    per round one shrinkage and one left-factor product for all its matrices, and one output
    GEMM per matrix (per stack when the stack is a view of the gradients and none of it reran).
    Each matrix's result is _denoise_stack's (adaptive_svd per chunk) up to GEMM rounding."""
    stacks, views, v0, gens, key = _chunk_stacks(chunks, mats, warm_start, generators)
    dev = stacks[0].device
    thr, dims = _row_consts(key, sigma, kappa, dev, ws)
    stats: dict = {}
    rounds, carried = adaptive_svd_stacks(
        stacks, thr, v0, generators=None if generators is None else gens, stats=stats,
        workspace=None if ws is None else ws.setdefault("svd", {}), **kw)
    offs = [0]
    for b, _, _ in key:
        offs.append(offs[-1] + b)
    if norm_correction:
        fro2 = torch.cat([a.square().sum((-2, -1)) for a in stacks]).double()      # (B,)
        mn = _per_row([m * n * sigma**2 for _, m, n in key], [b for b, _, _ in key], dev,
                      torch.float64)
    max_rank = kw["max_rank"]
    for rnd_no, rnd in enumerate(rounds):
        for (u, s, vh, rows), done in zip(rnd.blocks, rnd.done):
            gidx = [offs[j] + i for j, i in rows]
            whole = gidx == list(range(offs[-1]))
            sel = None if whole else torch.tensor(gidx, device=dev)
            eta = shrink_rows(s, sigma, dims if whole else dims[sel], shrinker, kappa)
            if max_rank is not None:        # adaptive_svd keeps at most cap values
                caps = [max(1, min(int(max_rank), key[j][1])) for j, _ in rows]
                if min(caps) < eta.shape[1]:
                    cols = torch.arange(eta.shape[1], device=dev)
                    eta = eta * (cols < torch.tensor(caps, device=dev)[:, None])
            counts = (eta > 0).sum(1)
            if norm_correction:
                eta = _norm_gain(eta, fro2 if whole else fro2[sel], mn if whole else mn[sel],
                                 max_norm_gain)
            left = u * eta[:, None, :]                                   # U diag(eta)
            r = 0
            while r < len(rows):                 # the block's rows, one stack at a time
                j = rows[r][0]
                r1 = r
                while r1 < len(rows) and rows[r1][0] == j:
                    r1 += 1
                chunk, m, n, flip = chunks[j]
                lj, vj = left[r:r1, :m], vh[r:r1, :, :n]
                if views[j] and rnd_no == 0 and r1 - r == key[j][0] and all(done[r:r1]):
                    torch.matmul(vj.mT, lj.mT, out=stacks[j].mT) if flip else \
                        torch.matmul(lj, vj, out=stacks[j])
                else:
                    for t in range(r, r1):
                        if done[t]:
                            i = chunk[rows[t][1]]
                            _write(mats[i], vh[t, :, :n].mT, left[t, :m].mT) if flip else \
                                _write(mats[i], left[t, :m], vh[t, :, :n])
                r = r1
            fin = [t for t, d in enumerate(done) if d]
            ids = [chunks[rows[t][0]][0][rows[t][1]] for t in fin]
            if ids:
                st["counts"].append((ids, counts if len(fin) == len(rows) else
                                     counts[torch.tensor(fin, device=dev)]))
    for (chunk, *_), vs in zip(chunks, carried):
        for i, v in zip(chunk, vs):
            st["vectors"][i] = v
    for k in ("passes", "iters", "reruns", "exact"):
        st[k] += stats.get(k, 0)
    st["pass_bytes"] += 4 * stats.get("pass_numel", 0)


def _denoise_warm(chunks, mats, warm_start, generators, sigma, shrinker, kappa, norm_correction,
                  max_norm_gain, rank, oversample, passes, orth, st, ws, results=None) -> None:
    """The sync-free warm path for every warm chunk of one device at once: chunks = [(matrix
    indices, m, n, flipped)], each stacked (a view or one copy), one rsvd.warm_svd_stacks call,
    one shrinkage and one left-factor GEMM for all, then one output GEMM per stack when the
    stack is the matrices themselves or `results` takes float32 copies' results (see
    _denoise_all), else one per matrix."""
    stacks, views, v0, gens, key = _chunk_stacks(chunks, mats, warm_start, generators)
    dev = stacks[0].device
    # per-row constants (thresholds, shrinker dims), filled on the device: no host copy
    thr, dims = _row_consts(key, sigma, kappa, dev, ws)
    stats: dict = {}
    res = warm_svd_stacks(stacks, thr, v0, rank=rank, oversample=oversample, passes=passes,
                          generators=None if generators is None else gens, orth=orth,
                          stats=stats, workspace=None if ws is None else ws.setdefault("svd", {}))
    eta = shrink_rows(res.s, sigma, dims, shrinker, kappa)               # (B, L), 0 on padding
    counts = (eta > 0).sum(1)
    if norm_correction:
        fro2 = torch.cat([a.square().sum((-2, -1)) for a in stacks]).double()      # (B,)
        mn = _per_row([m * n * sigma**2 for _, m, n in key], [b for b, _, _ in key], dev,
                      torch.float64)
        eta = _norm_gain(eta, fro2, mn, max_norm_gain)
    # a ~= u core vh, core nearly diagonal (rsvd.small_svd): G-hat = U core diag(eta / s) V^T
    gain = torch.where(res.s > 0, eta / res.s.clamp_min(1e-30), torch.zeros_like(eta))
    left_all = torch.matmul(res.u, (res.core * gain.double()[:, None, :]).to(res.u.dtype))
    for j, (chunk, m, n, flip) in enumerate(chunks):
        a0, a1, _, _, l, k = res.parts[j]
        left, vh = left_all[a0:a1, :m, :l], res.vh[a0:a1, :l, :n]
        # the stack is the gradients themselves, or a float32 copy of them whose results the
        # caller takes as new tensors: one GEMM writes them all (the copy is not read again)
        whole = views[j] or (results is not None
                             and all(mats[i].dtype == torch.float32 for i in chunk))
        if whole:
            torch.matmul(vh.mT, left.mT, out=stacks[j].mT) if flip else \
                torch.matmul(left, vh, out=stacks[j])
            if not views[j]:
                for i, x in zip(chunk, (stacks[j].mT if flip else stacks[j]).unbind(0)):
                    results[i] = x                                      # in mats[i]'s layout
        else:
            lt, vt = (vh.mT, left.mT) if flip else (left, vh)
            for i, x, y in zip(chunk, lt.unbind(0), vt.unbind(0)):
                _write(mats[i], x, y)
        for i, v in zip(chunk, vh[:, :k].mT.unbind(0)):
            st["vectors"][i] = v                                          # (n, k) view
        st["pass_bytes"] += passes * len(chunk) * m * n * 4
    st["counts"].append(([i for chunk, *_ in chunks for i in chunk], counts))
    st["saturated"] = st["saturated"] + res.saturated.sum()
    st["passes"] += stats.get("passes", 0)
    st["iters"] += stats.get("iters", 0)


def _write(t: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """t = left @ right; an fp32 contiguous t is written by the GEMM itself."""
    if t.dtype == torch.float32 and t.is_contiguous():
        torch.matmul(left, right, out=t)
    else:
        t.copy_(torch.matmul(left, right))


def _norm_gain(eta, fro2, mn_sigma2, max_norm_gain):
    """norm_correction: eta rescaled so ||G-hat||_F = sqrt(max(||G~||_F^2 - m n sigma^2, 0)),
    by a gain of at most max_norm_gain. fro2, mn_sigma2: (b,) float64 (or scalars)."""
    target = (fro2 - mn_sigma2).clamp_min(0.0).sqrt()
    norms = eta.double().norm(dim=1)                                      # = ||G-hat||_F
    gains = (target / norms.clamp_min(1e-300)).clamp_max(max_norm_gain).to(eta.dtype)
    return eta * gains[:, None]


def ranks_of(counts: list, size: int) -> list[int]:
    """info["counts"] (per chunk: matrix indices, device tensor of ranks) as a list of ints (a
    host sync per chunk)."""
    ranks = [0] * size
    for chunk, c in counts:
        for i, r in zip(chunk, c.tolist()):
            ranks[i] = int(r)
    return ranks


def _denoise_stack(ts, m, n, sigma, shrinker, kappa, norm_correction, max_norm_gain, method,
                   svd_kw, st) -> tuple[torch.Tensor, list]:
    """ts: tensors of one shape, (m, n) or (n, m), m <= n. Stacked as (b, m, n) fp32 (a
    transposed view for (n, m)), written back.
    Returns the ranks kept (a (b,) device tensor, not read here) and the vectors to carry (None
    on the exact path)."""
    flip = ts[0].shape[0] != m                         # one exact shape per stack
    a = _stack(ts)[0]
    a = a.mT if flip else a                                                   # (b, m, n)
    thr = kappa * bulk_edge(m, n, sigma)
    vecs = [None] * len(ts)
    v0, warm_passes = svd_kw.pop("v0"), svd_kw.pop("warm_passes")
    resync = svd_kw.pop("resync")
    core = None
    if method == "exact":
        u, s, vh = exact_svd(a, svd_kw["max_rank"])
        w = max(1, int((s > thr).sum(1).max()))          # the reference path: one host sync
        u, s, vh = u[..., :w], s[..., :w], vh[..., :w, :]
    elif v0 is not None and warm_passes is not None and not resync \
            and all(v is not None for v in v0):           # the sync-free warm path
        stats: dict = {}
        u, s, vh, core, saturated = warm_svd(a, thr, v0, rank=svd_kw["rank"],
                                       oversample=svd_kw["oversample"], passes=warm_passes,
                                       generators=svd_kw["generators"], orth=svd_kw["orth"],
                                       stats=stats)
        k = min(max([svd_kw["rank"]] + [v.shape[1] for v in v0]), vh.shape[-2])
        carried = vh[:, :k].mT.contiguous()                # (b, n, k): each matrix's top k
        vecs = list(carried.unbind(0))
        st["saturated"] = st["saturated"] + saturated.sum()
        for key in ("passes", "exact"):
            st[key] += stats.get(key, 0)
        st["iters"] += stats.get("iters", 0)
        st["pass_bytes"] += stats.get("passes", 0) * m * n * 4
    else:
        start = [svd_kw["rank"]] * len(ts)
        if v0 is not None:                     # carry the last kept rank as the starting rank
            start = [max(r, v.shape[1]) if v is not None else r for r, v in zip(start, v0)]
        stats = {}
        trip = adaptive_svd(a, thr, **(svd_kw | dict(rank=start)), v0=v0,
                            warm_passes=warm_passes, stats=stats)
        vecs = stats.pop("carry")
        for key in ("passes", "iters", "reruns", "exact", "unconverged"):
            st[key] += stats[key]
        st["pass_bytes"] += stats["passes"] * m * n * 4
        u, s, vh = _pad(trip, a)
    # All shrinkage of the chunk at once (same m, n); values at or below the threshold (and the
    # zero padding) shrink to 0, so the reconstruction needs no rank on the host.
    eta = shrink(s, sigma, m, n, shrinker, kappa)                           # (b, w)
    counts = (eta > 0).sum(1)
    if norm_correction:
        eta = _norm_gain(eta, a.square().sum((-2, -1)).double(), m * n * sigma**2, max_norm_gain)
    if core is None:
        left_all = u * eta[:, None, :]                                        # U diag(eta)
    else:   # a ~= u core vh, core nearly diagonal (rsvd.small_svd): U core diag(eta / s)
        gain = torch.where(s > 0, eta / s.clamp_min(1e-30), torch.zeros_like(eta))
        left_all = torch.matmul(u, (core * gain.double()[:, None, :]).to(u.dtype))
    for j, t in enumerate(ts):          # G-hat = left V^T, in t's own layout
        _write(t, vh[j].mT, left_all[j].mT) if flip else _write(t, left_all[j], vh[j])
    return counts, vecs


def _pad(trip, a):
    """adaptive_svd's per-matrix triplets (k_i columns) as zero-padded stacks of width max k_i."""
    b, m, n = a.shape
    w = max([1] + [s.numel() for _, s, _ in trip])
    u, s, vh = a.new_zeros(b, m, w), a.new_zeros(b, w), a.new_zeros(b, w, n)
    for j, (uj, sj, vhj) in enumerate(trip):
        k = sj.numel()
        u[j, :, :k], s[j, :k], vh[j, :k] = uj, sj, vhj
    return u, s, vh


class RMTDenoiser:
    """Engine post-processor: denoise every 2-D weight-gradient matrix of the released gradient.

    Called as ``denoiser(grads, noise_std)`` with ``grads`` the noisy averaged gradients by
    parameter name and ``noise_std`` = sigma * C / B_expected; modifies ``grads`` in place: each
    denoised name holds its result afterwards. In a dict, a float32 gradient that the call had
    to copy into a stack (separately allocated matrices of one shape, e.g. the engine's
    accumulators) is replaced by a view of that stack, written by one GEMM per stack, and the
    tensor it held is left as it was (the engine's optimizer takes the replaced entries); a
    gradient that is a view of one storage with the others of its shape, a 16-bit gradient, or
    one in a read-only mapping is overwritten.

    What is denoised: tensors with 2 dimensions and both dims >= ``min_dim``. Left as released:
    vectors (biases, norm weights: no matrix structure to exploit), tensors of other ranks (conv
    kernels), and every name matched by ``skip`` (substrings, default ``("embed",)``): embedding
    tables are matrices, but their gradient has one row per distinct token in the batch, a high-
    rank, row-sparse signal outside the low-rank model, which the shrinker would mostly zero. Pass
    ``skip=()`` to denoise them too, or build with :meth:`for_model` to skip ``nn.Embedding``
    weights by module type instead of by name.

    Warm start (``warm_start=True``, randomized method): a block of right singular vectors of
    each matrix is kept by parameter name and shape and starts the next call's subspace
    iteration, which then runs ``warm_passes`` GEMM passes (default 4) instead of the cold
    ``2 n_iter + 2`` (12), with no host-GPU sync: the call only launches work (see
    denoise/README.md). The block is the kept vectors plus ``carry`` more after a synchronous
    call, and keeps its width across warm calls; every ``resync_every``-th call (default 16; 0:
    never) is synchronous (one host sync per round): a matrix whose kept count reached the width
    is rerun at twice the rank, and the widths are reset to kept + carry. ``warm_passes=None``
    is the former adaptive warm path (convergence test ``tol`` after at least ``min_iter``
    iterations; a sync per pass). The vectors are computed from released gradients only
    (post-processing: the privacy guarantee is unchanged). A matrix with no state (first call,
    new name, other shape, after :meth:`reset`) runs the cold path, identical to
    ``warm_start=False``. The state is a starting guess only: whatever it holds (stale, from
    another run), the fresh random columns decide what it misses. :meth:`state_dict` /
    :meth:`load_state_dict` checkpoint it with the call counter.

    ``tf32`` (CUDA): the fp32 GEMMs of the call (subspace passes, reconstruction) in TF32 (True,
    the default), in IEEE fp32 (False), or as torch's global setting says (None). TF32 left the
    error to the planted signal unchanged (1.0223x the exact SVD's either way) and cut a warm
    call at the 1B model from 26.8 to 19.7 ms on an H100 (bench/results/gpu_h100_f65b551); the
    small factorisations run in float64 whatever it says. The released gradient is public, so
    this precision is a utility choice, not a privacy one.

    Other arguments: see :func:`denoise_matrices_`. ``seed`` seeds the random sketches (public
    randomness: it plays no part in the privacy guarantee). After each call ``last_ranks`` holds
    the number of singular values kept per denoised name (read back from the device when first
    accessed: a host sync) and ``last_stats`` the cost (GEMM passes, bytes read, reruns,
    warm-started, unconverged and saturated matrices, ``syncless`` whether the call made no host
    sync; see denoise_matrices_'s ``info``; ``saturated`` is a 0-d device tensor).

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
                 warm_start: bool = True, warm_passes: int | None = 4, resync_every: int = 16,
                 tol: float = 0.05, min_iter: int = 1, carry: int = 4, skip: Iterable[str] = ("embed",), skip_names: Iterable[str] = (),
                 min_dim: int = 2, seed: int = 0, max_batch_numel: int = 1 << 28,
                 tf32: bool | None = True):
        if tf32 not in (True, False, None):
            raise ValueError(f"tf32 must be True, False or None, got {tf32!r}")
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
        if warm_passes is not None and int(warm_passes) < 2:
            raise ValueError(f"warm_passes must be None or >= 2, got {warm_passes!r}")
        if int(resync_every) < 0:
            raise ValueError(f"resync_every must be >= 0, got {resync_every!r}")
        self.kwargs = dict(shrinker=shrinker, kappa=float(kappa), norm_correction=bool(norm_correction),
                           max_norm_gain=float(max_norm_gain), method=method, rank=int(rank),
                           oversample=int(oversample), n_iter=int(n_iter), max_rank=max_rank,
                           orth=orth, max_batch_numel=int(max_batch_numel), tol=float(tol),
                           min_iter=int(min_iter), carry=int(carry),
                           warm_passes=None if warm_passes is None else int(warm_passes))
        self.resync_every = int(resync_every)
        self.tf32 = tf32
        self.warm_start = bool(warm_start) and method == "randomized"
        self.skip = tuple(s.lower() for s in skip)
        self.skip_names = frozenset(skip_names)
        self.min_dim = int(min_dim)
        self.seed = int(seed)
        self.calls = 0
        self.last_stats: dict = {}
        self._ranks: tuple = ((), [])            # (names, info["counts"]) of the last call
        self._last_ranks: dict[str, int] | None = {}
        self._state: dict[str, dict] = {}       # name -> {"shape", "v" (max dim, c), "kept"}
        self._gens: dict = {}                   # (name, device) -> torch.Generator, re-seeded
        self._workspace: dict = {}              # warm path's buffers of the last stack layout

    @property
    def last_ranks(self) -> dict[str, int]:
        """Singular values kept per denoised name on the last call (read back on first access)."""
        if self._last_ranks is None:
            names, counts = self._ranks
            self._last_ranks = dict(zip(names, ranks_of(counts, len(names))))
        return self._last_ranks

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
        for k in names:          # one generator per name, kept, re-seeded per (seed, call, name)
            dev = grads[k].device
            g = self._gens.get((k, dev))
            if g is None:
                g = self._gens[(k, dev)] = torch.Generator(device=dev)
            g.manual_seed(zlib.crc32(f"{self.seed}:{call}:{k}".encode()))
            gens.append(g)
        warm = [self._start(k, grads[k]) for k in names] if self.warm_start else None
        resync = self.resync_every > 0 and call % self.resync_every == 0
        info: dict = {}
        mats = [grads[k] for k in names]
        results = [None] * len(names) if isinstance(grads, MutableMapping) else None
        if noise_std > 0:
            with (contextlib.nullcontext() if self.tf32 is None or not mats else
                  fp32_matmul(mats[0].device, "tf32" if self.tf32 else "ieee")):
                _denoise_all(mats, noise_std, generators=gens, warm_start=warm, resync=resync,
                             info=info, workspace=self._workspace, results=results,
                             **self.kwargs)
            for k, r in zip(names, results or ()):
                if r is not None:
                    grads[k] = r
            self._ranks, self._last_ranks = (names, info.pop("counts")), None
        else:
            info = {"passes": 0, "pass_bytes": 0, "numel": 0, "warm": 0}
            self._ranks, self._last_ranks = ((), []), {k: min(grads[k].shape) for k in names}
        vectors = info.pop("vectors", [None] * len(names))
        kept = {}
        for chunk, c in self._ranks[1]:
            kept.update({names[i]: c[j] for j, i in enumerate(chunk)})   # 0-d device views
        if self.warm_start and noise_std > 0:
            for k, v in zip(names, vectors):
                if v is None:
                    self._state.pop(k, None)
                else:
                    self._state[k] = {"shape": tuple(grads[k].shape), "v": v, "kept": kept[k]}
        info["syncless"] = bool(warm) and not resync and self.kwargs["warm_passes"] is not None \
            and info.get("warm", 0) == len(names) and self.kwargs["method"] == "randomized"
        info["passes_per_matrix"] = info["passes"] / max(len(names), 1)
        info["sweeps"] = info["pass_bytes"] / max(4 * info["numel"], 1)
        self.last_stats = info

    def reset(self) -> None:
        """Forget the warm-start state: the next call is cold (as with warm_start=False)."""
        self._state = {}
        self._workspace = {}

    def state_dict(self) -> dict:
        """{"calls": int, "matrices": {name: {"shape": [rows, cols], "v": (max dim, c), "kept"}}}:
        the call counter (it seeds the sketches) and the warm-start vectors. Derived from released
        gradients only; torch.save / torch.load(weights_only=True) round-trip it."""
        # v is a view into the last call's batched output: cloned, or torch.save would write
        # the whole batch's storage with each view
        return {"calls": self.calls,
                "matrices": {k: {"shape": list(e["shape"]),
                                 "v": e["v"].clone(memory_format=torch.contiguous_format),
                                 "kept": int(e["kept"])}
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
        return (f"RMTDenoiser({kw}, warm_start={self.warm_start}, "
                f"resync_every={self.resync_every}, skip={self.skip!r}, "
                f"min_dim={self.min_dim}, tf32={self.tf32})")
