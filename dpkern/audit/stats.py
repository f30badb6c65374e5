"""Statistical checks on released noise and on Poisson batches, with tolerances that cannot drift.

Each check returns a report whose ``failures`` list is empty when the sample is consistent with the
claim; ``assert_ok()`` raises with every failure spelled out. Tolerances are fixed in advance:

* std: |std_hat / std - 1| <= 1% (with 10^6 draws the standard error is 0.07%, so a 5% error in
  sigma fails by ~70 standard errors, and a correct sigma passes by ~14).
* KS against N(0, std^2): p-value >= 1e-4 (the test is exact for the sample size).
* two-sided tail mass beyond 3 and 4 std: within 6 binomial standard errors (plus 3 counts).
* mean: |mean| <= 6 std / sqrt(n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats

STD_RTOL = 0.01
KS_MIN_P = 1e-4
Z_TOL = 6.0


@dataclass
class Report:
    values: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def assert_ok(self) -> None:
        if self.failures:
            raise AssertionError("; ".join(self.failures) + f" (measured: {self.values})")


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def gaussian_report(samples, std: float, min_draws: int = 1_000_000) -> Report:
    """Checks samples (any shape) against N(0, std^2): std, mean, KS, tails beyond 3 and 4 std."""
    x = _as_f64(samples)
    n = x.size
    rep = Report()
    if n < min_draws:
        rep.failures.append(f"only {n} draws, need >= {min_draws}")
        return rep
    if not np.isfinite(x).all():
        rep.failures.append("non-finite noise values")
        return rep
    std_hat = float(np.sqrt(np.mean(x * x)))
    mean = float(x.mean())
    ks_p = float(stats.kstest(x / std, "norm").pvalue)
    rep.values.update(n=n, std_ratio=std_hat / std, mean_over_std=mean / std, ks_p=ks_p)
    if abs(std_hat / std - 1.0) > STD_RTOL:
        rep.failures.append(f"std {std_hat:.6g} is not within {STD_RTOL:.0%} of {std:.6g}")
    if abs(mean) > Z_TOL * std / math.sqrt(n):
        rep.failures.append(f"mean {mean:.3g} is not ~0 (std {std:.3g}, n {n})")
    if ks_p < KS_MIN_P:
        rep.failures.append(f"KS test against N(0, {std:.4g}^2) rejects (p={ks_p:.2e})")
    for k in (3.0, 4.0):
        p = 2.0 * stats.norm.sf(k)
        seen = int(np.count_nonzero(np.abs(x) > k * std))
        tol = Z_TOL * math.sqrt(n * p * (1 - p)) + 3
        rep.values[f"tail{int(k)}"] = (seen, n * p)
        if abs(seen - n * p) > tol:
            rep.failures.append(f"{seen} draws beyond {k:g} std, expected {n * p:.0f} +- {tol:.0f}")
    return rep


def correlation_report(a, b, max_abs_z: float = Z_TOL) -> Report:
    """Two noise samples of equal size should be independent: |corr| * sqrt(n) <= max_abs_z."""
    x, y = _as_f64(a), _as_f64(b)
    rep = Report()
    if x.size != y.size or x.size < 2:
        rep.failures.append(f"need two samples of equal size >= 2, got {x.size} and {y.size}")
        return rep
    corr = float(np.corrcoef(x, y)[0, 1])
    z = corr * math.sqrt(x.size)
    rep.values.update(corr=corr, z=z)
    if not abs(z) <= max_abs_z:  # also fails on NaN (a constant sample)
        rep.failures.append(f"samples are correlated: corr={corr:.4g} (z={z:.1f})")
    if x.size and bool(np.all(x == y)):
        rep.failures.append("samples are identical (noise reused)")
    return rep


def poisson_report(masks, q: float) -> Report:
    """masks [T, N] bool: which of N records each of T steps sampled; each must be Bernoulli(q) iid.

    Checks the batch sizes (mean and variance of Bin(N, q)), each record's inclusion count over the
    T steps (a chi-square over records of Bin(T, q)), and the lag-1 correlation between steps.
    """
    mk = torch.as_tensor(masks).to(torch.bool).cpu().numpy()
    rep = Report()
    if mk.ndim != 2 or mk.shape[0] < 2:
        rep.failures.append(f"masks must be [T >= 2, N], got {mk.shape}")
        return rep
    t_steps, n = mk.shape
    sizes = mk.sum(axis=1).astype(np.float64)
    mean_size, var_size = n * q, n * q * (1 - q)
    se_mean = math.sqrt(var_size / t_steps)
    rep.values.update(mean_batch=float(sizes.mean()), expected_batch=mean_size,
                      var_batch=float(sizes.var(ddof=1)), expected_var=var_size)
    if abs(sizes.mean() - mean_size) > Z_TOL * se_mean + 1e-9:
        rep.failures.append(f"mean batch size {sizes.mean():.2f}, expected {mean_size:.2f}")
    # sample variance of T normals ~ var * chi2(T-1)/(T-1): generous 6-sigma band
    if var_size > 0 and abs(sizes.var(ddof=1) / var_size - 1) > Z_TOL * math.sqrt(2 / (t_steps - 1)):
        rep.failures.append(f"batch-size variance {sizes.var(ddof=1):.2f}, expected {var_size:.2f}")
    counts = mk.sum(axis=0).astype(np.float64)
    if 0 < q < 1:
        chi2 = float(((counts - t_steps * q) ** 2 / (t_steps * q * (1 - q))).sum())
        p = float(stats.chi2.sf(chi2, n - 1)) if chi2 > n else float(stats.chi2.cdf(chi2, n - 1))
        rep.values.update(per_record_chi2=chi2, per_record_p=p)
        if p < KS_MIN_P:
            rep.failures.append(f"per-record inclusion counts are not Bin(T, q) (p={p:.2e})")
        x = mk[:-1].ravel().astype(np.float64)
        y = mk[1:].ravel().astype(np.float64)
        z = float(np.corrcoef(x, y)[0, 1]) * math.sqrt(x.size)
        rep.values["lag1_z"] = z
        if abs(z) > Z_TOL:
            rep.failures.append(f"consecutive batches are correlated (z={z:.1f})")
    return rep
