"""Batched randomized truncated SVD by subspace iteration, with a rank that grows until it has
found every singular value above a threshold, and an optional warm start + convergence test.

All the work is batched GEMMs over a stack of equal-shape matrices (b, m, n), each one pass over the
stack with a skinny (n, l) or (m, l) operand, l = rank + oversample: 2 * n_iter + 2 passes with a
fixed iteration count. Orthonormalising the (m, l) / (n, l) blocks is CholeskyQR2 with the tiny
(l, l) Gram matrices factored in float64 (GEMM-bound; falls back to Householder QR for any matrix
whose Gram is not positive definite), or plain Householder QR (`orth="qr"`). The small SVDs are of
(l, l) triangles, in float64.

With `tol`, the iteration stops as soon as every matrix of the stack passes a convergence test
(residuals of the kept triplets, stable threshold decision; see `_converged`), after `min_iter` and
at most `n_iter` iterations. Computation is float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch

ORTHS = ("cholqr2", "qr")


def _cholqr(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CholeskyQR pass: y (b, r, l) = q r, Gram factored in float64. Returns (q, r, ok[b])."""
    gram = torch.matmul(y.mT, y).double()                             # (b, l, l)
    # Shift by a few ulps of the largest diagonal so an exactly rank-deficient block still factors.
    diag_max = gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gram = gram + (1e-14 * diag_max)[:, None, None] * eye
    l_fac, info = torch.linalg.cholesky_ex(gram)                       # gram = L L^T
    r = l_fac.mT                                                       # upper triangular
    q = torch.linalg.solve_triangular(r, y.double(), upper=True, left=False).to(y.dtype)
    return q, r, info == 0


def orthonormalize(y: torch.Tensor, orth: str = "cholqr2") -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a stack of tall-skinny blocks: y (b, r, l) -> q (b, r, l), r (b, l, l) float64."""
    if orth == "qr":
        q, r = torch.linalg.qr(y, mode="reduced")
        return q, r.double()
    if orth != "cholqr2":
        raise ValueError(f"orth must be one of {ORTHS}, got {orth!r}")
    q1, r1, ok1 = _cholqr(y)
    q2, r2, ok2 = _cholqr(q1)
    q, r = q2, torch.matmul(r2, r1)
    bad = ~(ok1 & ok2) | ~torch.isfinite(q).flatten(1).all(1)
    if bool(bad.any()):  # one host sync per call; only ill-conditioned blocks take the slow path
        idx = bad.nonzero().flatten()
        qh, rh = torch.linalg.qr(y[idx], mode="reduced")
        q = q.clone()
        q[idx] = qh
        r = r.clone()
        r[idx] = rh.double()
    return q, r


def _converged(svd_prev, x_prev, y, s_now, thr, k, tol):
    """Per-matrix convergence test, from skinny and small matrices only (no pass over the stack).

    The last two passes were op(a) x_prev = x r_prev (x_prev orthonormal) and y = op(a)^T x, with
    op = a or a^T. svd_prev = (W, S, Z^T), the SVD of r_prev, gives Ritz triplets (x W, S, x_prev Z) with op(a) x_prev z_i =
    s_i x w_i exactly, so their residual is rho_i = ||op(a)^T x w_i - s_i x_prev z_i|| =
    ||y w_i - s_i x_prev z_i|| (then a singular value of a lies within rho_i of s_i, and the
    vectors are within an angle ~rho_i / gap of singular vectors). s_now (b, l): the Ritz values
    from y. A matrix has converged when
      - its kth value s_now[k-1] (a lower bound of the true one) is above the threshold: it will be
        rerun at a larger rank whatever more iterations would give; or
      - as many values are above the threshold in S as in s_now (a stable decision), and every kept
        triplet has rho_i * sqrt(1 - (thr / s_i)^2) <= tol * s_i. The weight is the fraction of s_i
        that the Frobenius shrinker keeps (square case): a value near the threshold, the slowest to
        converge, is shrunk to almost nothing, so its residual matters that much less.
    """
    w, s, zt = svd_prev                                                 # float64
    res = torch.matmul(y, w.to(y.dtype)) - torch.matmul(x_prev, (zt.mT * s[:, None, :]).to(y.dtype))
    rho = torch.linalg.vector_norm(res.double(), dim=-2)                # (b, l)
    kept = s > thr[:, None]
    same = kept.sum(1) == (s_now > thr[:, None]).sum(1)
    weight = (1.0 - (thr[:, None] / s.clamp_min(1e-300)).square()).clamp_min(0.0).sqrt()
    resid_ok = ((rho * weight <= tol * s) | ~kept).all(1)
    return (s_now[:, k - 1] > thr) | (same & resid_ok)


def subspace_iteration(a: torch.Tensor, omega: torch.Tensor, k: int, *, n_iter: int,
                       orth: str = "cholqr2", tol: float | None = None,
                       min_iter: torch.Tensor | int = 0, threshold: torch.Tensor | None = None,
                       stats: dict | None = None):
    """Ritz triplets of a (b, m, n) from the subspace iteration started at omega (b, n, l).

    Passes alternate a @ x and a^T @ x. Without `tol`: exactly n_iter iterations, 2 n_iter + 2
    passes (the cold path). With `tol` (and a (b,) `threshold`): after each pass from the
    2 min_iter + 2nd on (min_iter: a scalar or per-matrix (b,) tensor), stops as soon as every
    matrix passes `_converged`; at most 2 n_iter + 2 passes. Omega is then orthonormalised first.
    Returns u (b, m, l), s (b, l) descending, vh (b, l, n), all l triplets, from the last pass;
    stats["passes"], stats["iters"] and stats["unconverged"] are incremented by the passes (x b),
    the full iterations (x b, a pass short of one counted as a half) and the matrices with
    min_iter < n_iter stopped by the cap without passing the test.
    """
    b = a.shape[0]
    x = orthonormalize(omega, orth)[0] if tol is not None else omega    # right side, (b, n, l)
    if tol is not None:
        min_iter = torch.as_tensor(min_iter, device=a.device).expand(b)
    max_passes = 2 * n_iter + 2
    passes, unconv, x_prev, svd_prev, svd_r = 0, 0, None, None, None
    while True:
        right = passes % 2 == 0                         # x holds right vectors: multiply by a
        y = torch.matmul(a if right else a.mT, x)      # (b, m, l) or (b, n, l)
        passes += 1
        x_new, r = orthonormalize(y, orth)              # op(a) x = x_new r
        if tol is not None:                             # one small SVD per pass, reused below
            svd_r = torch.linalg.svd(r, full_matrices=False)
        if passes == max_passes:
            if tol is not None and x_prev is not None:  # the cap: who stopped unconverged
                conv = _converged(svd_prev, x_prev, y, svd_r[1], threshold, k, tol)
                unconv = int((~conv & (min_iter < n_iter)).sum())
            break
        if tol is not None and x_prev is not None:
            eligible = passes >= 2 * min_iter + 2
            if bool(eligible.any()):
                conv = _converged(svd_prev, x_prev, y, svd_r[1], threshold, k, tol)
                if bool((conv & eligible).all()):      # one host sync per pass
                    break
        x_prev, svd_prev, x = x, svd_r, x_new
    if right:   # a x = x_new r, r = W S Z^T: u = x_new W, v = x Z
        w, s, zt = svd_r if svd_r is not None else torch.linalg.svd(r, full_matrices=False)
        u, vh = torch.matmul(x_new, w.to(a.dtype)), torch.matmul(zt.to(a.dtype), x.mT)
    elif svd_r is not None:   # a^T x = x_new r: a ~= x r^T x_new^T = (x Z) S (x_new W)^T
        w, s, zt = svd_r
        u, vh = torch.matmul(x, zt.mT.to(a.dtype)), torch.matmul(w.mT.to(a.dtype), x_new.mT)
    else:       # the cold path, as it always was: r^T = w s z^T
        w, s, zt = torch.linalg.svd(r.mT, full_matrices=False)
        u, vh = torch.matmul(x, w.to(a.dtype)), torch.matmul(zt.to(a.dtype), x_new.mT)
    if stats is not None:
        stats["passes"] = stats.get("passes", 0) + passes * b
        stats["iters"] = stats.get("iters", 0) + (passes - 2) / 2 * b
        stats["unconverged"] = stats.get("unconverged", 0) + unconv
    return u, s.to(a.dtype), vh


def randomized_svd(a: torch.Tensor, rank: int, *, oversample: int = 8, n_iter: int = 4,
                   omega: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   orth: str = "cholqr2") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of each matrix in a stack by randomized subspace iteration.

    Args:
        a: (b, m, n) float32 with m <= n (pass the transpose otherwise).
        rank: singular triplets to return, 1 <= rank <= m.
        oversample: extra columns l - rank in the sketch (l capped at m).
        n_iter: subspace (power) iterations; each costs two passes over `a`.
        omega: optional (b, n, l) starting block (e.g. a warm start); random if None.
        generator: torch.Generator for the random start (ignored if omega is given).
        orth: "cholqr2" (GEMM-bound) or "qr" (Householder).
    Returns:
        u (b, m, rank), s (b, rank) descending, vh (b, rank, n); float32.

    Example:
        >>> a = torch.randn(2, 30, 50)
        >>> u, s, vh = randomized_svd(a, 5)
        >>> u.shape, s.shape, vh.shape
        (torch.Size([2, 30, 5]), torch.Size([2, 5]), torch.Size([2, 5, 50]))
    """
    if a.dim() != 3:
        raise ValueError(f"a must have rank 3 (b, m, n), got shape {tuple(a.shape)}")
    b, m, n = a.shape
    if m > n:
        raise ValueError(f"a must have m <= n (got m={m}, n={n}); pass a.mT and swap u and vh")
    if not 1 <= rank <= m:
        raise ValueError(f"rank must be in [1, m={m}], got {rank}")
    if oversample < 0 or n_iter < 0:
        raise ValueError(f"oversample and n_iter must be >= 0, got {oversample}, {n_iter}")
    l = min(rank + oversample, m)
    if omega is None:
        omega = torch.randn(b, n, l, device=a.device, dtype=a.dtype, generator=generator)
    elif omega.shape != (b, n, l):
        raise ValueError(f"omega must have shape {(b, n, l)}, got {tuple(omega.shape)}")
    u, s, vh = subspace_iteration(a, omega.to(a.dtype), rank, n_iter=n_iter, orth=orth)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def exact_svd(a: torch.Tensor, rank: int | None = None):
    """torch.linalg.svd of the stack, truncated to `rank` (all if None): the reference path."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    if rank is not None:
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    return u, s, vh


def adaptive_svd(a: torch.Tensor, threshold: torch.Tensor | float, *, rank: int | Sequence[int] = 8,
                 oversample: int = 8, n_iter: int = 4, max_rank: int | None = None,
                 generators: list[torch.Generator] | None = None, orth: str = "cholqr2",
                 exact_above: float = 0.5, v0: Sequence[torch.Tensor | None] | None = None,
                 tol: float | None = None, min_iter: int = 0, carry: int = 0,
                 stats: dict | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Every singular triplet above `threshold`, for each matrix of a stack, at the smallest rank.

    Runs the subspace iteration at `rank`; a matrix whose smallest found singular value is still
    above its threshold is rerun (alone with the others that need it) at twice the rank, warm-
    started from the right singular vectors found so far. Once the rank reaches exact_above * m (or
    max_rank), the exact SVD is used for what remains. Matrix i's random start comes only from
    generators[i], so batching does not change any matrix's result (up to GEMM rounding).

    Warm start: v0[i], a (n, c) block (e.g. the last step's kept right singular vectors), replaces
    the first c columns of matrix i's random start; the other l - c >= oversample columns stay
    random (so new directions can still enter). Matrices with a v0 run with the convergence test
    at `tol` from `min_iter` iterations (capped at n_iter); those without run exactly n_iter
    iterations (the cold behaviour). tol=None: fixed n_iter for all.

    Args:
        a: (b, m, n) float32, m <= n.
        threshold: scalar or (b,) tensor: singular values <= threshold are not needed.
        rank: starting rank, one for all or one per matrix (the largest is used for the stack).
        generators: one torch.Generator per matrix (or None: the global RNG).
        v0: per matrix, None or an (n, c) block of starting vectors (c <= rank is used).
        carry: also return, in stats["carry"], each matrix's top (kept + carry) right vectors
            (n, c_i) float32: the next call's v0.
        stats: dict, updated with "passes" (sum over GEMMs of the matrices they read: b per full
            pass), "iters", "reruns" (matrices rerun at a larger rank), "exact" (matrices finished
            by torch.linalg.svd), "unconverged" (warm matrices stopped by the n_iter cap).
    Returns:
        list of b triplets (u (m, k_i), s (k_i,), vh (k_i, n)), k_i = count above threshold
        (possibly 0), s descending.
    """
    b, m, n = a.shape
    thr = torch.as_tensor(threshold, dtype=a.dtype, device=a.device).expand(b)
    cap = m if max_rank is None else max(1, min(int(max_rank), m))
    st = stats if stats is not None else {}
    for key in ("passes", "iters", "reruns", "exact", "unconverged"):
        st.setdefault(key, 0)
    carried: list = [None] * b
    out: list = [None] * b
    warm = [v0 is not None and v0[i] is not None for i in range(b)]
    use_tol = tol is not None and any(warm)
    todo = torch.arange(b, device=a.device)
    ranks = [rank] * b if isinstance(rank, int) else list(rank)
    k = max(1, min(max(int(r) for r in ranks), cap))
    starts: list = [v0[i] if warm[i] else None for i in range(b)]    # per matrix, (n, c) or None
    first = True
    while todo.numel():
        idx_list = todo.tolist()
        sub = a if first else a[todo]     # a[todo] copies the stack: only for reruns
        sub_thr = thr[todo]
        if k >= exact_above * m or k + oversample >= m:
            u, s, vh = exact_svd(sub, cap)
            st["exact"] += len(idx_list)
            more = torch.zeros(len(idx_list), dtype=torch.bool, device=a.device)
        else:
            l = k + oversample
            omega = torch.empty(len(idx_list), n, l, device=a.device, dtype=a.dtype)
            for j, i in enumerate(idx_list):
                g = generators[i] if generators is not None else None
                omega[j] = torch.randn(n, l, device=a.device, dtype=a.dtype, generator=g)
                if starts[i] is not None:                               # warm start
                    c = min(starts[i].shape[-1], k)
                    omega[j, :, :c] = starts[i][:, :c].to(device=a.device, dtype=a.dtype)
            min_it = torch.tensor([min_iter if warm[i] else n_iter for i in idx_list],
                                  device=a.device)
            u, s, vh = subspace_iteration(sub, omega, k, n_iter=n_iter, orth=orth,
                                          tol=tol if use_tol else None, min_iter=min_it,
                                          threshold=sub_thr, stats=st)
            more = (s[:, k - 1] > sub_thr) & (k < cap)
        more_host = more.tolist()                                       # one sync per round
        keeps = (s > sub_thr[:, None]).sum(1).tolist()
        for j, i in enumerate(idx_list):
            if more_host[j]:
                starts[i] = vh[j, :k].mT                               # rerun from what was found
                continue
            keep = min(keeps[j], cap)
            out[i] = (u[j, :, :keep], s[j, :keep], vh[j, :keep, :])
            if carry:
                carried[i] = vh[j, :min(keeps[j] + carry, vh.shape[-2])].mT.contiguous()
        st["reruns"] += sum(more_host)
        todo = todo[more]
        k = min(2 * k, cap)
        first = False
    st["carry"] = carried
    return out
