"""Privacy you can audit: one-run audit statistics, Dirac canaries, and the audit harness.

* :mod:`dpkern.audit.bounds`    epsilon lower bounds from (m canaries, r guesses, v right):
  Steinke-Nasr-Jagielski 2023 and the f-DP variant of Mahloujifar-Melis-Chaudhuri 2024.
* :mod:`dpkern.audit.canaries`  one-hot canaries on private coordinates, secret coins, scores.
* :mod:`dpkern.audit.harness`   ``one_run_audit(train_fn, canaries, ...)`` -> ``AuditResult``.
* :mod:`dpkern.audit.stats`     noise and sampler statistics (std, KS, tails) used by the tests.
* :mod:`dpkern.audit.sensitivity` neighbouring pairs packed K per engine pass for sensitivity fuzzing.

See docs/privacy_audit.md.
"""
from dpkern.audit.bounds import (approx_dp_min_fpr, epsilon_lower_bound, epsilon_lower_bound_fdp,
                                 fdp_rejects, gdp_min_fpr, mu_lower_bound, p_value_approx_dp)
from dpkern.audit.canaries import DiracCanaries, count, draw_coins, guess
from dpkern.audit.harness import AuditResult, audit_scores, one_run_audit

__all__ = [
    "AuditResult",
    "DiracCanaries",
    "approx_dp_min_fpr",
    "audit_scores",
    "count",
    "draw_coins",
    "epsilon_lower_bound",
    "epsilon_lower_bound_fdp",
    "fdp_rejects",
    "gdp_min_fpr",
    "guess",
    "mu_lower_bound",
    "one_run_audit",
    "p_value_approx_dp",
]
