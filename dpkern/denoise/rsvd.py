"""Batched randomized truncated SVD by subspace iteration, with a rank that grows until it has
found every singular value above a threshold.

All the work is batched GEMMs over a stack of equal-shape matrices (b, m, n): 2 * n_iter + 2 passes
over the stack with a skinny (n, l) or (m, l) operand, l = rank + oversample. Orthonormalising the
(m, l) / (n, l) blocks is CholeskyQR2 with the tiny (l, l) Gram matrices factored in float64 (GEMM-
bound; falls back to Householder QR for any matrix whose Gram is not positive definite), or plain
Householder QR (`orth="qr"`). The final small SVD is of an (l, l) triangle, in float64.

Computation is float32 whatever the input dtype (bf16 gradients are upcast once, when stacked).
"""
from __future__ import annotations

import torch

ORTHS = ("cholqr2", "qr")


def _cholqr(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    q, _ = orthonormalize(torch.matmul(a, omega.to(a.dtype)), orth)    # (b, m, l)
    for _ in range(n_iter):
        p, _ = orthonormalize(torch.matmul(a.mT, q), orth)              # (b, n, l)
        q, _ = orthonormalize(torch.matmul(a, p), orth)                 # (b, m, l)
    # a ~= q q^T a = q (a^T q)^T; a^T q = p r  =>  a ~= q r^T p^T, and r^T = w s z^T (small SVD).
    p, r = orthonormalize(torch.matmul(a.mT, q), orth)                  # (b, n, l), (b, l, l)
    w, s, zt = torch.linalg.svd(r.mT, full_matrices=False)             # float64, (l, l)
    u = torch.matmul(q, w[..., :rank].to(a.dtype))                     # (b, m, rank)
    vh = torch.matmul(zt[..., :rank, :].to(a.dtype), p.mT)             # (b, rank, n)
    return u, s[..., :rank].to(a.dtype), vh


def exact_svd(a: torch.Tensor, rank: int | None = None):
    """torch.linalg.svd of the stack, truncated to `rank` (all if None): the reference path."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    if rank is not None:
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    return u, s, vh


def adaptive_svd(a: torch.Tensor, threshold: torch.Tensor | float, *, rank: int = 8,
                 oversample: int = 8, n_iter: int = 4, max_rank: int | None = None,
                 generators: list[torch.Generator] | None = None, orth: str = "cholqr2",
                 exact_above: float = 0.5) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every singular triplet above `threshold`, for each matrix of a stack, at the smallest rank.

    Runs randomized_svd at `rank`; a matrix whose smallest found singular value is still above its
    threshold is rerun (alone with the others that need it) at twice the rank, warm-started from the
    right singular vectors found so far. Once the rank reaches exact_above * m (or max_rank), the
    exact SVD is used for what remains. Deterministic per matrix: matrix i's random start comes
    only from generators[i], so batching does not change any matrix's result (up to GEMM rounding).

    Args:
        a: (b, m, n) float32, m <= n.
        threshold: scalar or (b,) tensor: singular values <= threshold are not needed.
        generators: one torch.Generator per matrix (or None: the global RNG).
    Returns:
        list of b triplets (u (m, k_i), s (k_i,), vh (k_i, n)), k_i = count above threshold
        (possibly 0), s descending.
    """
    b, m, n = a.shape
    thr = torch.as_tensor(threshold, dtype=a.dtype, device=a.device).expand(b)
    cap = m if max_rank is None else max(1, min(int(max_rank), m))
    out: list = [None] * b
    todo = torch.arange(b, device=a.device)
    k = max(1, min(int(rank), cap))
    v_prev = None                                                       # (len(todo), n, k_prev)
    while todo.numel():
        idx_list = todo.tolist()
        sub, sub_thr = a[todo], thr[todo]
        if k >= exact_above * m or k + oversample >= m:
            u, s, vh = exact_svd(sub, cap)
            more = torch.zeros(len(idx_list), dtype=torch.bool, device=a.device)
        else:
            l = k + oversample
            omega = torch.empty(len(idx_list), n, l, device=a.device, dtype=a.dtype)
            for j, i in enumerate(idx_list):
                g = generators[i] if generators is not None else None
                omega[j] = torch.randn(n, l, device=a.device, dtype=a.dtype, generator=g)
            if v_prev is not None:                                      # warm start
                omega[:, :, :v_prev.shape[-1]] = v_prev
            u, s, vh = randomized_svd(sub, k, oversample=oversample, n_iter=n_iter, omega=omega,
                                      orth=orth)
            more = (s[:, -1] > sub_thr) & (k < cap)
        more_host = more.tolist()                                       # one sync per round
        keeps = (s > sub_thr[:, None]).sum(1).tolist()
        for j, i in enumerate(idx_list):
            if not more_host[j]:
                keep = keeps[j]
                out[i] = (u[j, :, :keep], s[j, :keep], vh[j, :keep, :])
        todo = todo[more]
        v_prev = vh[more].mT if todo.numel() else None
        k = min(2 * k, cap)
    return out
