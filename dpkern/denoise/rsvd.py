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

from collections import defaultdict
from typing import NamedTuple, Sequence

import torch

from dpkern._alloc import device_constants, empty
from dpkern.backend import requested_backend, triton_available

ORTHS = ("cholqr2", "qr")


def _cholqr_kernel(y: torch.Tensor) -> bool:
    """Whether _cholqr's passes run as one Triton launch (kernels/cholqr.py): on CUDA unless
    DPKERN_BACKEND=torch, on the CPU only with DPKERN_BACKEND=triton under TRITON_INTERPRET=1
    (tests); for float32 / float64 blocks of 1 to MAX_L columns."""
    from dpkern.kernels.cholqr import MAX_L
    if not (y.dim() == 3 and y.dtype in (torch.float32, torch.float64)
            and 1 <= y.shape[-1] <= MAX_L and y.shape[0] > 0 and y.shape[1] > 0):
        return False
    name = requested_backend()
    if name == "torch" or not triton_available(y.device):
        return False
    return y.device.type == "cuda" or name == "triton"


def _cholqr_launch(y, passes, coef, rows=None, cols=None):
    """kernels/cholqr.py on y -> (q, r); coef None: _cholqr's, of y's own (rows, l)."""
    from dpkern.kernels.cholqr import cholqr_fwd
    b, n, l = y.shape
    if coef is None:
        coef = device_constants([shift_coef(n, l)] * b, y.device, torch.float64)
    q = empty(b, n, l, dtype=y.dtype, device=y.device)
    r = empty(b, l, l, dtype=torch.float64, device=y.device)
    cholqr_fwd(y, q, r, passes, coef, rows=rows, cols=cols)
    return q, r


def _cholqr(y: torch.Tensor, coef: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One shifted CholeskyQR pass, Gram and solve in float64: y (b, r, l) = q r, r float64.

    The shift s = 11 (r l + l (l + 1)) u ||y||_F^2 (u = 2^-53; shifted CholeskyQR, Fukaya et al.
    2020, with ||y||_F >= ||y||_2) makes the shifted Gram positive definite in float64 for any
    finite y, rank-deficient or zero included, so the factorisation never fails and no host check
    is needed. y = q r holds to rounding whatever the shift; the shift only leaves q short of
    orthonormal along directions of y below sqrt(s) (~1e-5 ||y|| at r = 5504, l = 24), which the
    second pass of cholqr2 repairs. A non-finite y gives a non-finite q (as Householder QR would).
    This torch form is the reference of kernels/cholqr.py, which `orthonormalize` and `small_svd`
    launch instead where `_cholqr_kernel` says so.

    Padded stacks (`warm_svd_stacks`): `coef` (b,) float64 is each matrix's own 11 (r l + l (l + 1))
    u for its real rows and columns, and `mask` (b, l) float64 (1 = real column) keeps zero-padded
    columns out of the trace, so each matrix's block is computed as if it were alone (its padding
    columns get q = 0 and a diagonal sqrt(s) in r; the off-diagonal blocks stay exactly 0).
    """
    rows, l = y.shape[-2:]
    y64 = y.double()
    gram = torch.matmul(y64.mT, y64)                                   # (b, l, l)
    diag = gram.diagonal(dim1=-2, dim2=-1)
    trace = (diag if mask is None else diag * mask).sum(-1)
    if coef is None:
        shift = trace * (11.0 * (rows * l + l * (l + 1)) * 2.0**-53) + 1e-300
    else:
        shift = trace * coef + 1e-300
    diag.add_(shift[:, None])
    r = torch.linalg.cholesky_ex(gram)[0].mT                           # gram = r^T r, upper
    if rows > 2 * l:
        # a tall block: q = y r^-1 as one float64 GEMM with the inverse of the small triangle.
        # cuBLAS's batched triangular solve on the tall block ran ~20x slower than the GEMM
        # (12.7 of 33 ms of a warm call at the 1B model, H100). The inverse costs a relative
        # error ~cond(r) u64 <= ~1e-11 here (the shift bounds cond(r)), far below the float32
        # rounding of q.
        eye = torch.eye(l, dtype=torch.float64, device=y.device).expand_as(r)
        q = torch.matmul(y64, torch.linalg.solve_triangular(r, eye, upper=True)).to(y.dtype)
    else:
        q = torch.linalg.solve_triangular(r, y64, upper=True, left=False).to(y.dtype)
    return q, r


def shift_coef(rows: int, l: int) -> float:
    """_cholqr's shift coefficient 11 (r l + l (l + 1)) 2^-53 for an (r, l) block."""
    return 11.0 * (rows * l + l * (l + 1)) * 2.0**-53


def orthonormalize(y: torch.Tensor, orth: str = "cholqr2", *, coef: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, rows: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a stack of tall-skinny blocks: y (b, r, l) -> q (b, r, l), r (b, l, l) float64.

    "cholqr2": two shifted CholeskyQR passes (`_cholqr`), GEMM-bound, no host decision (an
    exactly rank-deficient block gets zero columns in q where Householder QR would complete an
    orthonormal basis; the range and y = q r are the same). "qr": Householder (torch.linalg.qr).
    coef, mask: per-matrix shift coefficients and real columns of a zero-padded stack (see
    `_cholqr`); with "qr", q's padding columns (Householder's completion) are zeroed by `mask`.
    rows: (b,) int32 real rows per block of a zero-padded stack (the kernel skips the rest), or
    None.
    """
    if orth == "qr":
        q, r = torch.linalg.qr(y, mode="reduced")
        if mask is not None:
            q = q * mask[:, None, :].to(q.dtype)
        return q, r.double()
    if orth != "cholqr2":
        raise ValueError(f"orth must be one of {ORTHS}, got {orth!r}")
    if _cholqr_kernel(y):
        return _cholqr_launch(y, 2, coef, rows=rows)
    q1, r1 = _cholqr(y, coef)
    q2, r2 = _cholqr(q1, coef)
    return q2, torch.matmul(r2, r1)


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


def small_svd(r: torch.Tensor, steps: int = 8, *, coef: torch.Tensor | None = None,
              mask: torch.Tensor | None = None):
    """r (b, l, l) float64 = w t z^T with w, z orthogonal and t nearly diagonal, its diagonal
    descending: `steps` steps of the QR algorithm, each two CholeskyQR factorisations
    (t^T = q1 r1, r1^T = q2 r2, t <- r2 = q2^T t q1), with no host sync (torch.linalg.svd and
    eigh check their convergence on the host). The off-diagonal entries (i, j) shrink like
    (s_j / s_i)^2 per step; what remains couples only values close to each other. Returns
    (w, t, z), t's rows and columns ordered by its diagonal.

    Stacks of different l in one call: zero-pad each r to the common l and pass `coef` (b,) (each
    matrix's `shift_coef(l_i, l_i)`) and `mask` (b, l) float64 (1 on its l_i real columns). The
    blocks stay block diagonal (padding and real part never mix), each real block is computed
    as if alone, and the padding sorts last: w, t, z[i, :l_i, :l_i] are matrix i's results.
    """
    b, l, _ = r.shape
    w = z = None
    t = r
    kernel = _cholqr_kernel(r)
    if kernel:              # one launch per factorisation; the coefficients and columns once
        cols = None if mask is None else mask.sum(1).to(torch.int32)
        if coef is None:
            coef = device_constants([shift_coef(l, l)] * b, r.device, torch.float64)
    for _ in range(steps):
        if kernel:
            q1, r1 = _cholqr_launch(t.mT, 1, coef, cols=cols)
            q2, t = _cholqr_launch(r1.mT, 1, coef, cols=cols)
        else:
            q1, r1 = _cholqr(t.mT, coef, mask)
            q2, t = _cholqr(r1.mT, coef, mask)
        # the first step's z = I q1 and w = I q2 exactly: no product needed
        z = q1 if z is None else torch.matmul(z, q1)
        w = q2 if w is None else torch.matmul(w, q2)
    if z is None:
        w = z = torch.eye(l, dtype=r.dtype, device=r.device).expand(b, l, l)
    key = t.diagonal(dim1=-2, dim2=-1)
    if mask is not None:                                  # padding sorts after every real value
        key = torch.where(mask > 0, key, float("-inf"))
    order = key.argsort(dim=-1, descending=True)                               # (b, l)
    cols = order[:, None, :].expand(b, l, l)
    t = t.gather(-1, cols).gather(-2, order[:, :, None].expand(b, l, l))
    return w.gather(-1, cols), t, z.gather(-1, cols)


def _ritz(x, x_new, r, right, svd_r=None, small_steps=None):
    """Ritz triplets from the last pass op(a) x = x_new r: u (b, m, l), s (b, l) float64, vh,
    and the core: None (a ~= u diag(s) vh) or, with `small_steps` (sync-free small_svd), a
    nearly diagonal (b, l, l) float64 c with a ~= u c vh and s = diag(c)."""
    dt = x.dtype
    if small_steps is not None:
        w, t, z = small_svd(r, small_steps)
        if right:   # a x = x_new w t z^T
            u, c, vh = torch.matmul(x_new, w.to(dt)), t, torch.matmul(z.mT.to(dt), x.mT)
        else:       # a^T x = x_new w t z^T: a ~= (x z) t^T (x_new w)^T
            u, c, vh = torch.matmul(x, z.to(dt)), t.mT, torch.matmul(w.mT.to(dt), x_new.mT)
        return u, c.diagonal(dim1=-2, dim2=-1), vh, c
    if right:   # a x = x_new r, r = W S Z^T: u = x_new W, v = x Z
        w, s, zt = svd_r if svd_r is not None else torch.linalg.svd(r, full_matrices=False)
        return torch.matmul(x_new, w.to(dt)), s, torch.matmul(zt.to(dt), x.mT), None
    if svd_r is not None:   # a^T x = x_new r: a ~= x r^T x_new^T = (x Z) S (x_new W)^T
        w, s, zt = svd_r
        return torch.matmul(x, zt.mT.to(dt)), s, torch.matmul(w.mT.to(dt), x_new.mT), None
    w, s, zt = torch.linalg.svd(r.mT, full_matrices=False)          # r^T = W S Z^T
    return torch.matmul(x, w.to(dt)), s, torch.matmul(zt.to(dt), x_new.mT), None


def subspace_iteration(a: torch.Tensor, omega: torch.Tensor, k: int, *, n_iter: int,
                       passes: int | None = None, orth: str = "cholqr2",
                       tol: float | None = None, min_iter: torch.Tensor | int = 0,
                       threshold: torch.Tensor | None = None, stats: dict | None = None,
                       small_steps: int | None = None):
    """Ritz triplets of a (b, m, n) from the subspace iteration started at omega (b, n, l).

    Passes alternate a @ x and a^T @ x, each followed by `orthonormalize`; one float64 SVD of the
    last (l, l) factor gives the triplets. The pass count:
      - `passes` (>= 1): exactly that many, fixed on the host; nothing is read back from the
        device (no host sync with orth="cholqr2"). The warm path.
      - else, without `tol`: 2 n_iter + 2 passes (the cold path), also sync-free.
      - else (`tol` and a (b,) `threshold`): omega is orthonormalised first; after each pass from
        the 2 min_iter + 2nd on (min_iter: a scalar or per-matrix (b,) tensor), stops as soon as
        every matrix passes `_converged`; at most 2 n_iter + 2 passes. Costs one (l, l) SVD and
        one host sync per pass (the former warm path, kept as `warm_passes=None`).
    Returns u (b, m, l), s (b, l) descending, vh (b, l, n), all l triplets, from the last pass
    (with `small_steps`, the small SVD is rsvd.small_svd's, sync-free, and a 4th output, the
    nearly diagonal core c (b, l, l) float64 with a ~= u c vh, s = diag(c));
    stats["passes"], stats["iters"] and stats["unconverged"] are incremented by the passes (x b),
    the full iterations (x b, a pass short of one counted as a half) and the matrices with
    min_iter < n_iter stopped by the cap without passing the test.
    """
    b = a.shape[0]
    adaptive = tol is not None and passes is None
    x = orthonormalize(omega, orth)[0] if adaptive else omega           # right side, (b, n, l)
    if adaptive:
        min_iter = torch.as_tensor(min_iter, device=a.device).expand(b)
    max_passes = passes if passes is not None else 2 * n_iter + 2
    if max_passes < 1:
        raise ValueError(f"passes must be >= 1, got {max_passes}")
    done, unconv, x_prev, svd_prev, svd_r = 0, 0, None, None, None
    while True:
        right = done % 2 == 0                           # x holds right vectors: multiply by a
        y = torch.matmul(a if right else a.mT, x)      # (b, m, l) or (b, n, l)
        done += 1
        x_new, r = orthonormalize(y, orth)              # op(a) x = x_new r
        if adaptive:                                    # one small SVD per pass, reused below
            svd_r = torch.linalg.svd(r, full_matrices=False)
        if done == max_passes:
            if adaptive and x_prev is not None:         # the cap: who stopped unconverged
                conv = _converged(svd_prev, x_prev, y, svd_r[1], threshold, k, tol)
                unconv = int((~conv & (min_iter < n_iter)).sum())
            break
        if adaptive and x_prev is not None:
            eligible = done >= 2 * min_iter + 2
            if bool(eligible.any()):
                conv = _converged(svd_prev, x_prev, y, svd_r[1], threshold, k, tol)
                if bool((conv & eligible).all()):      # one host sync per pass
                    break
        x_prev, svd_prev, x = x, svd_r, x_new
    u, s, vh, core = _ritz(x, x_new, r, right, svd_r, small_steps)
    if stats is not None:
        stats["passes"] = stats.get("passes", 0) + done * b
        stats["iters"] = stats.get("iters", 0) + (done - 2) / 2 * b
        stats["unconverged"] = stats.get("unconverged", 0) + unconv
    if small_steps is not None:
        return u, s.to(a.dtype), vh, core
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
                 warm_passes: int | None = None,
                 stats: dict | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Every singular triplet above `threshold`, for each matrix of a stack, at the smallest rank.

    Runs the subspace iteration at `rank`; a matrix whose smallest found singular value is still
    above its threshold is rerun (alone with the others that need it) at twice the rank, warm-
    started from the right singular vectors found so far. Once the rank reaches exact_above * m (or
    max_rank), the exact SVD is used for what remains. Matrix i's random start comes only from
    generators[i], so batching does not change any matrix's result (up to GEMM rounding).

    Warm start: v0[i], a (n, c) block (e.g. the last step's kept right singular vectors), replaces
    the first c columns of matrix i's random start; the other l - c >= oversample columns stay
    random (so new directions can still enter). A round whose matrices all have a v0 (or were
    rerun from one) runs exactly `warm_passes` passes; a round with a cold matrix runs the cold
    2 n_iter + 2. warm_passes=None: matrices with a v0 run the convergence test at `tol` from
    `min_iter` iterations (capped at n_iter; one host sync and one small SVD per pass) and those
    without exactly n_iter iterations; tol=None too: fixed n_iter for all.
    Host syncs: one per round (the rerun decision). `warm_svd` is the sync-free warm path.

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
    thr = _per_matrix(threshold, a)
    cap = m if max_rank is None else max(1, min(int(max_rank), m))
    st = stats if stats is not None else {}
    for key in ("passes", "iters", "reruns", "exact", "unconverged"):
        st.setdefault(key, 0)
    carried: list = [None] * b
    out: list = [None] * b
    warm = [v0 is not None and v0[i] is not None for i in range(b)]
    use_tol = tol is not None and any(warm) and warm_passes is None
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
            min_it = (torch.tensor([min_iter if warm[i] else n_iter for i in idx_list],
                                   device=a.device) if use_tol else 0)
            fixed = warm_passes if all(warm[i] for i in idx_list) else None
            u, s, vh = subspace_iteration(sub, omega, k, n_iter=n_iter, orth=orth,
                                          passes=None if use_tol else fixed,
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


def _per_matrix(threshold, a: torch.Tensor) -> torch.Tensor:
    """threshold (scalar or (b,) tensor) as a (b,) tensor on a's device, without a host copy."""
    if isinstance(threshold, torch.Tensor):
        return threshold.to(device=a.device, dtype=a.dtype).expand(a.shape[0])
    return torch.full((a.shape[0],), float(threshold), dtype=a.dtype, device=a.device)


def as_batch(ts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one (len(ts), *shape) view when they are equally spaced, non-overlapping
    views of one storage with the same shape, strides and dtype (e.g. slices of a stack), else
    None: a stack with no copy."""
    t0 = ts[0]
    if len(ts) == 1:
        return t0[None]
    shape, strides, size = t0.shape, t0.stride(), t0.element_size()
    base = t0.data_ptr() - t0.storage_offset() * size
    offs = [t0.storage_offset()]
    for t in ts[1:]:
        if (t.shape != shape or t.stride() != strides or t.dtype != t0.dtype
                or t.device != t0.device or t.data_ptr() - t.storage_offset() * size != base):
            return None
        offs.append(t.storage_offset())
    step = offs[1] - offs[0]
    extent = 1 + sum((d - 1) * st for d, st in zip(shape, strides))
    if step < extent or any(b - a != step for a, b in zip(offs, offs[1:])):
        return None
    return t0.as_strided((len(ts),) + tuple(shape), (step,) + tuple(strides), offs[0])


class StackedSVD(NamedTuple):
    """warm_svd_stacks' output: every stack's matrices in one zero-padded batch (B = sum of b_j).

    u (B, max m, L), s (B, L) (0 past l_j), vh (B, L, max n), core (B, L, L) float64 (a ~= u core
    vh, nearly diagonal, s its diagonal), saturated (B,) bool; `parts[j]` = (start, stop, m, n,
    l, k) of stack j: its results are u[start:stop, :m, :l], s[start:stop, :l], vh[..., :l, :n],
    core[..., :l, :l]. Outside those blocks everything is 0 (core's padding diagonal aside)."""
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    core: torch.Tensor
    saturated: torch.Tensor
    parts: list

    def stack(self, j: int):
        """Stack j's (u, s, vh, core, saturated) as views."""
        a, b, m, n, l, _ = self.parts[j]
        return (self.u[a:b, :m, :l], self.s[a:b, :l], self.vh[a:b, :l, :n],
                self.core[a:b, :l, :l], self.saturated[a:b])


def _per_row(vals: Sequence[float], sizes: Sequence[int], device, dtype) -> torch.Tensor:
    """(sum sizes,) tensor repeating vals[j] sizes[j] times, filled on the device (no host copy,
    so no host-GPU sync)."""
    parts = [torch.full((b,), float(v), dtype=dtype, device=device) for v, b in zip(vals, sizes)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _workspace(layout: tuple, device, dtype, orth: str, workspace: dict | None) -> dict:
    """Buffers and constants of one stack layout ((b, m, n, l, k) per stack), kept across calls
    in `workspace` (one layout at a time): the zero-padded pass outputs (their padding is never
    written, so it stays 0), the random-start blocks, the shift coefficients and column masks."""
    if workspace is not None and workspace.get("layout") == (layout, device, dtype, orth):
        return workspace
    sizes = [p[0] for p in layout]
    big_b, big_l = sum(sizes), max(p[3] for p in layout)
    ws = {"layout": (layout, device, dtype, orth),
          "y_m": torch.zeros(big_b, max(p[1] for p in layout), big_l, dtype=dtype, device=device),
          "y_n": torch.zeros(big_b, max(p[2] for p in layout), big_l, dtype=dtype, device=device),
          "omega": [torch.empty(b, n, l, dtype=dtype, device=device) for b, _, n, l, _ in layout],
          "coef_m": _per_row([shift_coef(m, l) for _, m, _, l, _ in layout], sizes, device,
                             torch.float64),
          "coef_n": _per_row([shift_coef(n, l) for _, _, n, l, _ in layout], sizes, device,
                             torch.float64),
          "coef_l": _per_row([shift_coef(l, l) for *_, l, _ in layout], sizes, device,
                             torch.float64),
          "kth": _per_row([k - 1 for *_, k in layout], sizes, device, torch.int64)[:, None],
          # real rows per block of y_m / y_n: the CholeskyQR kernel skips the padding
          "rows_m": _per_row([m for _, m, _, _, _ in layout], sizes, device, torch.int32),
          "rows_n": _per_row([n for _, _, n, _, _ in layout], sizes, device, torch.int32)}
    ws["mask"] = None                   # every stack has the same l: nothing is padded there
    if any(p[3] != big_l for p in layout):
        cols = torch.arange(big_l, device=device)
        ws["mask"] = (cols < _per_row([p[3] for p in layout], sizes, device, torch.int64)[:, None]
                      ).double()                                                 # (B, L)
    if workspace is not None:
        workspace.clear()
        workspace.update(ws)
    return ws


def _fill_start(omega: torch.Tensor, starts: Sequence[torch.Tensor | None] | None, k: int,
                gens: Sequence[torch.Generator] | None) -> None:
    """omega (b, n, l) <- matrix i's own random (n, l) block (gens[i]: batching-invariant
    sketches), its first min(c_i, k) columns replaced by starts[i] (n, c_i) (None: all random).
    Starts of one width that are equally spaced views of one storage go in one copy."""
    b, n, l = omega.shape
    for i in range(b):
        torch.randn(n, l, generator=None if gens is None else gens[i], out=omega[i])
    if starts is None or all(v is None for v in starts):
        return
    widths = {min(int(v.shape[-1]), k) for v in starts if v is not None}
    c = widths.pop() if len(widths) == 1 and all(v is not None for v in starts) else None
    batch = as_batch([v[:, :c] for v in starts]) if c is not None else None
    if batch is not None:
        omega[:, :, :c].copy_(batch)                             # one copy for the stack
        return
    for i, v in enumerate(starts):
        if v is not None:
            c = min(int(v.shape[-1]), k)
            omega[i, :, :c].copy_(v[:, :c])


def _stacked_passes(stacks, xs, parts, passes: int, ws: dict, orth: str):
    """`passes` (>= 2) subspace-iteration passes over every stack at once: per pass one GEMM per
    stack into the zero-padded buffer ws["y_m"] / ws["y_n"], then one orthonormalisation of the
    whole buffer. xs[j]: stack j's start (b_j, n_j, l_j). Returns the last q, the one before
    (the last pass was op(a) q_prev = q r), r (B, L, L) float64, and whether the last pass
    multiplied by a (right=True) or a^T."""
    colmask = ws["mask"] if orth == "qr" else None
    q = q_prev = r = None
    right = True
    for p in range(passes):
        right = p % 2 == 0                  # x holds right vectors: multiply by a
        y = ws["y_m"] if right else ws["y_n"]
        for (a0, a1, m, n, l, _), a, x in zip(parts, stacks, xs):
            torch.bmm(a if right else a.mT, x, out=y[a0:a1, :m if right else n, :l])
        q_prev, (q, r) = q, orthonormalize(y, orth, coef=ws["coef_m" if right else "coef_n"],
                                           mask=colmask, rows=ws["rows_m" if right else "rows_n"])
        xs = [q[a0:a1, :m if right else n, :l] for a0, a1, m, n, l, _ in parts]
    return q, q_prev, r, right


def warm_svd_stacks(stacks: Sequence[torch.Tensor], thresholds: torch.Tensor,
                    v0: Sequence[Sequence[torch.Tensor]], *, rank: int = 8, oversample: int = 8,
                    passes: int = 4, generators: Sequence[Sequence[torch.Generator] | None] | None
                    = None, orth: str = "cholqr2", small_steps: int = 8,
                    stats: dict | None = None, workspace: dict | None = None) -> StackedSVD:
    """warm_svd of several stacks of different shapes at once: one GEMM per stack and pass, and
    everything else (the orthonormalisation of every pass, the small SVD, the Ritz vectors) one
    batched call over all stacks, zero-padded to common sizes.

    stacks[j]: (b_j, m_j, n_j), m_j <= n_j (any strides, e.g. a transposed view); l_j =
    min(k_j + oversample, m_j) < m_j, k_j = min(max(rank, widths of v0[j]), m_j). thresholds:
    (sum b_j,) on the device, in stack order. generators[j]: None or one per matrix of stack j.
    Each matrix's result is the one warm_svd gives for it alone, up to the rounding of GEMMs of
    other sizes: padding rows and columns are exact zeros, and _cholqr / small_svd keep each
    matrix's own shift (`coef`, `mask`), so padding never mixes with a real block.
    workspace: a dict kept by the caller across calls (the padded buffers of the last layout);
    None allocates them for this call.
    """
    if passes < 2:   # the right side of the output is the unorthonormalised start itself
        raise ValueError(f"warm_svd: passes must be >= 2, got {passes}")
    if len(v0) != len(stacks):
        raise ValueError("warm_svd_stacks: one list of start blocks per stack")
    dev, dt = stacks[0].device, stacks[0].dtype
    layout = []
    for a, starts in zip(stacks, v0):
        b, m, n = a.shape
        if len(starts) != b or any(v is None for v in starts):
            raise ValueError("warm_svd: every matrix needs a start block v0[i]")
        k = min(max([rank] + [int(v.shape[-1]) for v in starts]), m)
        l = min(k + oversample, m)
        if l >= m:
            raise ValueError(f"warm_svd_stacks: l = {l} >= m = {m} (use warm_svd: exact SVD)")
        layout.append((b, m, n, l, k))
    ws = _workspace(tuple(layout), dev, dt, orth, workspace)
    mask = ws["mask"]
    parts, xs, start = [], [], 0
    for j, (a, starts, (b, m, n, l, k)) in enumerate(zip(stacks, v0, layout)):
        omega = ws["omega"][j]                                   # (b, n, l)
        _fill_start(omega, starts, k, generators[j] if generators is not None else None)
        parts.append((start, start + b, m, n, l, k))
        xs.append(omega)
        start += b
        if stats is not None:
            stats["passes"] = stats.get("passes", 0) + passes * b
            stats["iters"] = stats.get("iters", 0) + (passes - 2) / 2 * b
    q, q_prev, r, right = _stacked_passes(stacks, xs, parts, passes, ws, orth)
    w, t, z = small_svd(r, small_steps, coef=ws["coef_l"], mask=mask)
    if right:   # last pass a x = q w t z^T (x = q_prev): u = q w, vh = z^T x^T
        u, core, vh = torch.matmul(q, w.to(dt)), t, torch.matmul(z.mT.to(dt), q_prev.mT)
    else:       # a^T x = q w t z^T: a ~= (x z) t^T (q w)^T
        u, core, vh = torch.matmul(q_prev, z.to(dt)), t.mT, torch.matmul(w.mT.to(dt), q.mT)
    s = core.diagonal(dim1=-2, dim2=-1)
    s = (s if mask is None else s * mask).to(dt)                 # (B, L), 0 on the padding
    saturated = s.gather(1, ws["kth"])[:, 0] > thresholds
    return StackedSVD(u, s, vh, core, saturated, parts)


def warm_svd(a: torch.Tensor, threshold: torch.Tensor | float, v0: Sequence[torch.Tensor], *,
             rank: int = 8, oversample: int = 8, passes: int = 4,
             generators: list[torch.Generator] | None = None, orth: str = "cholqr2",
             small_steps: int = 8, stats: dict | None = None):
    """Warm-started truncated SVD of a stack with no host sync: fixed width, passes, no reruns.

    Every matrix has a start block v0[i] (n, c_i). Width k = max(rank, max_i c_i) for the stack,
    l = min(k + oversample, m); matrix i's start is its own random (n, l) block (generators[i],
    as in adaptive_svd) with the first c_i columns replaced by v0[i]. Then exactly `passes`
    passes (subspace_iteration) and a sync-free float64 SVD of the (l, l) factor (small_svd,
    `small_steps` QR steps).

    Returns u (b, m, l), s (b, l) descending, vh (b, l, n), core (b, l, l) float64 (a ~= u core
    vh, nearly diagonal, s its diagonal; None from the exact SVD): all l Ritz triplets, for the caller
    to keep those above its threshold (Ritz values are lower bounds of the true ones: none is
    kept wrongly); and saturated (b,) bool, a device tensor never read here: the kth value is
    above the threshold, i.e. the kept count reached the carried width, so the values past the
    kth come from the less converged oversampling columns and those past the lth are lost (the
    synchronous adaptive_svd would rerun at 2k). If l >= m, the exact SVD.
    """
    b, m, n = a.shape
    if len(v0) != b or any(v is None for v in v0):
        raise ValueError("warm_svd: every matrix needs a start block v0[i]")
    if passes < 2:   # the right side of the output is the unorthonormalised start itself
        raise ValueError(f"warm_svd: passes must be >= 2, got {passes}")
    k = min(max([rank] + [int(v.shape[-1]) for v in v0]), m)
    l = min(k + oversample, m)
    thr = _per_matrix(threshold, a)
    if l >= m:
        u, s, vh = exact_svd(a)
        if stats is not None:
            stats["exact"] = stats.get("exact", 0) + b
        return u, s, vh, None, s[:, k - 1] > thr
    res = warm_svd_stacks([a], thr, [v0], rank=rank, oversample=oversample, passes=passes,
                          generators=None if generators is None else [generators], orth=orth,
                          small_steps=small_steps, stats=stats)
    return res.stack(0)


class SyncRound(NamedTuple):
    """One round of `adaptive_svd_stacks`: blocks of results and, per block row, what became of
    the matrix. blocks: list of (u (b, M, W), s (b, W), vh (b, W, N), rows) with rows[r] =
    (stack j, matrix i of stack j) for block row r; zero-padded past each matrix's (m, n, width);
    the rows of one stack are consecutive.
    done[t] (host list per block) whether the row's matrix is finished (kept values below its
    width), keeps[t] the count above the threshold (host ints)."""
    blocks: list
    done: list
    keeps: list


def _sync_svd_stacks(stacks, starts, ks, *, oversample: int, passes: int, generators,
                     orth: str, workspace: dict | None):
    """One synchronous round over several stacks at once: the `passes` passes of
    `subspace_iteration` (start = each matrix's random block with its start columns, not
    orthonormalised), then torch.linalg.svd of the last (l, l) factors, one call per run of
    stacks of equal l (no padding enters an SVD). Returns u (B, M, L), s (B, L) (0 past l_j), vh
    (B, L, N), parts [(start, stop, m, n, l, k)], and (B, 1) the index k - 1 of each row;
    zero outside each matrix's block."""
    dev, dt = stacks[0].device, stacks[0].dtype
    layout = tuple((a.shape[0], a.shape[1], a.shape[2], k + oversample, k)
                   for a, k in zip(stacks, ks))
    ws = _workspace(layout, dev, dt, orth, workspace)
    parts, xs, start = [], [], 0
    for j, (a, (b, m, n, l, k)) in enumerate(zip(stacks, layout)):
        omega = ws["omega"][j]
        _fill_start(omega, starts[j], k, generators[j] if generators is not None else None)
        parts.append((start, start + b, m, n, l, k))
        xs.append(omega)
        start += b
    q, q_prev, r, right = _stacked_passes(stacks, xs, parts, passes, ws, orth)
    big_b, big_l = r.shape[0], r.shape[-1]
    if right:   # a x = q r, r = W S Z^T: u = q W, vh = Z^T x^T (x = q_prev)
        left, rt = q, r
    else:       # a^T x = q r: a ~= x r^T q^T, r^T = W S Z^T: u = x W, vh = Z^T q^T
        left, rt = q_prev, r.mT
    right_q = q_prev if right else q
    if all(p[4] == big_l for p in parts):             # one l: one SVD, no column padding
        w, sv, zt = torch.linalg.svd(rt, full_matrices=False)
        return (torch.matmul(left, w.to(dt)), sv.to(dt), torch.matmul(zt.to(dt), right_q.mT),
                parts, ws["kth"])
    u = torch.zeros(big_b, left.shape[1], big_l, dtype=dt, device=dev)
    vh = torch.zeros(big_b, big_l, right_q.shape[1], dtype=dt, device=dev)
    s = torch.zeros(big_b, big_l, dtype=dt, device=dev)
    runs: list = []                                   # maximal runs of stacks of equal l
    for a0, a1, _, _, l, _ in parts:
        if runs and runs[-1][2] == l:
            runs[-1][1] = a1
        else:
            runs.append([a0, a1, l])
    for a0, a1, l in runs:
        w, sv, zt = torch.linalg.svd(rt[a0:a1, :l, :l], full_matrices=False)
        torch.matmul(left[a0:a1, :, :l], w.to(dt), out=u[a0:a1, :, :l])
        torch.matmul(zt.to(dt), right_q[a0:a1, :, :l].mT, out=vh[a0:a1, :l])
        s[a0:a1, :l] = sv
    return u, s, vh, parts, ws["kth"]


def adaptive_svd_stacks(stacks: Sequence[torch.Tensor], thresholds: torch.Tensor,
                        v0: Sequence[Sequence[torch.Tensor | None] | None], *, rank: int = 8,
                        oversample: int = 8, n_iter: int = 4, max_rank: int | None = None,
                        generators: Sequence[Sequence[torch.Generator] | None] | None = None,
                        orth: str = "cholqr2", exact_above: float = 0.5, carry: int = 0,
                        warm_passes: int | None = None, stats: dict | None = None,
                        workspace: dict | None = None) -> tuple[list, list]:
    """`adaptive_svd` of several stacks of different shapes at once, with the fixed pass count
    (no convergence test): each round runs every stack (or the matrices of it still to rerun)
    through one set of passes (one GEMM per stack and pass, one orthonormalisation of all per
    pass), one torch.linalg.svd per run of equal l, and reads the rerun decision and the kept
    counts of all stacks back in one host sync. Each matrix's result is adaptive_svd's for its
    stack, up to GEMM rounding (the same random blocks from its generator, the same widths,
    passes, reruns and exact fallback).

    stacks[j] (b_j, m_j, n_j), m_j <= n_j; thresholds (sum b_j,) in stack order; v0[j]: None or
    per matrix None or an (n_j, c) start. Stack j's width is min(max(rank, its start widths),
    cap_j) (cap_j = m_j, or max_rank), a round of stack j runs `warm_passes` passes when every
    matrix in it has a start (was warm) and warm_passes is set, else 2 n_iter + 2; a stack whose
    width reaches exact_above * m_j (or width + oversample >= m_j) uses exact_svd. workspace:
    the kept buffers for the first round's layout (shared with warm_svd_stacks when the layouts
    agree).
    Returns (rounds, carried): rounds, a list of SyncRound; carried[j][i], matrix i's top
    (kept + carry) right vectors (n_j, c) (views; None when carry == 0).
    """
    st = stats if stats is not None else {}
    for key in ("passes", "iters", "reruns", "exact"):
        st.setdefault(key, 0)
    nst = len(stacks)
    dev, dt = stacks[0].device, stacks[0].dtype
    shapes = [tuple(a.shape) for a in stacks]
    caps = [m if max_rank is None else max(1, min(int(max_rank), m)) for _, m, _ in shapes]
    v0 = [vs if vs is not None else [None] * b for vs, (b, _, _) in zip(v0, shapes)]
    warm = [[v is not None for v in vs] for vs in v0]
    starts = [list(vs) for vs in v0]
    ks = [max(1, min(max([rank] + [int(v.shape[-1]) for v in vs if v is not None]), cap))
          for vs, cap in zip(v0, caps)]
    offs = [0]
    for b, _, _ in shapes:
        offs.append(offs[-1] + b)
    todo = [list(range(b)) for b, _, _ in shapes]       # per stack, matrices still to do
    carried = [[None] * b for b, _, _ in shapes]
    rounds: list = []
    first = True
    while any(todo):
        # this round's stacks: the full stacks first, then the subsets to rerun (copied)
        jobs = []                                        # (j, idx, sub-stack)
        for j in range(nst):
            if todo[j]:
                idx = todo[j]
                a = stacks[j] if first else stacks[j][torch.tensor(idx, device=dev)]
                jobs.append((j, idx, a))
        groups: dict = defaultdict(list)                 # passes (or "exact") -> jobs
        for job in jobs:
            j, idx, a = job
            m = shapes[j][1]
            if ks[j] >= exact_above * m or ks[j] + oversample >= m:
                groups["exact"].append(job)
            else:
                all_warm = all(warm[j][i] for i in idx)
                groups[warm_passes if warm_passes is not None and all_warm
                       else 2 * n_iter + 2].append(job)
        blocks, flags = [], []
        for key, gjobs in groups.items():
            rows = [(j, i) for j, idx, _ in gjobs for i in idx]
            gidx = [offs[j] + i for j, i in rows]
            thr = thresholds if first and len(gjobs) == nst and key != "exact" and \
                len(groups) == 1 else thresholds[torch.tensor(gidx, device=dev)]
            if key == "exact":
                for j, idx, a in gjobs:
                    u, s, vh = exact_svd(a, caps[j])
                    t = thr[[r for r, (jj, _) in enumerate(rows) if jj == j]] \
                        if len(gjobs) > 1 else thr
                    blocks.append((u, s, vh, [(j, i) for i in idx], t, None))
                    st["exact"] += len(idx)
                continue
            ws = workspace if first and len(groups) == 1 else None
            u, s, vh, parts, kth = _sync_svd_stacks(
                [a for _, _, a in gjobs], [[starts[j][i] for i in idx] for j, idx, _ in gjobs],
                [ks[j] for j, _, _ in gjobs], oversample=oversample, passes=key,
                generators=None if generators is None else
                [None if generators[j] is None else [generators[j][i] for i in idx]
                 for j, idx, _ in gjobs], orth=orth, workspace=ws)
            blocks.append((u, s, vh, rows, thr, kth))
            st["passes"] += key * len(rows)
            st["pass_numel"] = st.get("pass_numel", 0) + key * sum(
                len(idx) * shapes[j][1] * shapes[j][2] for j, idx, _ in gjobs)
            st["iters"] += (key - 2) / 2 * len(rows)
        for u, s, vh, rows, thr, kth in blocks:
            keeps = (s > thr[:, None]).sum(1)
            if kth is None:
                more = torch.zeros_like(keeps)
            else:
                more = s.gather(1, kth)[:, 0] > thr
                if not all(ks[j] < caps[j] for j, _ in rows):   # at the cap: no rerun
                    more = more & torch.tensor([ks[j] < caps[j] for j, _ in rows], device=dev)
                more = more.long()
            flags.append(torch.stack([keeps, more]))
        host = torch.cat(flags, 1).tolist()              # one host sync per round
        keeps_all, more_all = host
        done_l, keeps_l, pos = [], [], 0
        nxt = [[] for _ in range(nst)]
        for u, s, vh, rows, thr, kth in blocks:
            d, kp = [], []
            for r, (j, i) in enumerate(rows):
                keep, more = keeps_all[pos + r], more_all[pos + r]
                d.append(not more)
                kp.append(min(keep, caps[j]))
                n = shapes[j][2]                                 # vh is padded to max n
                if more:
                    starts[j][i] = vh[r, :ks[j], :n].mT          # rerun from what was found
                    nxt[j].append(i)
                elif carry:
                    width = s.shape[1] if kth is None else ks[j] + oversample
                    carried[j][i] = vh[r, :min(keep + carry, width), :n].mT
            pos += len(rows)
            st["reruns"] += len(rows) - sum(d)
            done_l.append(d)
            keeps_l.append(kp)
        rounds.append(SyncRound([b[:4] for b in blocks], done_l, keeps_l))
        for j in range(nst):
            if nxt[j]:
                ks[j] = min(2 * ks[j], caps[j])
        todo = nxt
        first = False
    return rounds, carried
