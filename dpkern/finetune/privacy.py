"""The privacy plan of a run: σ from (ε, δ, q, steps) with the tight accountant, and the report.

Calibration happens before the model is loaded, so an impossible budget (one that needs more noise
than any useful run can carry) is an error before training, not a run that learns nothing.

``--method lmo-dp`` swaps the Gaussian for LMO-DP noise (dpkern.mechanisms): the paper's default
configuration with its inverse scale u multiplied by one factor s, the largest s whose ε(δ) over the
planned steps stays ≤ the target. By default ε is LMO-DP's *certified* bound (valid for any model
size); ``accept_uncertified_epsilon`` calibrates and reports the paper's own ε instead, labelled
"not certified", with the certified ε of the same noise beside it in privacy.json.
``lmo_params`` (a preset such as "paper-default", or a .json) fixes the noise instead: no calibration,
ε is reported after the run (like ``noise_multiplier`` for the Gaussian).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from dpkern.finetune.config import FinetuneConfig, FinetuneError

# Past this σ (noise std per released coordinate = σ·C, every step) a run learns nothing useful;
# a budget that needs more is reported as impossible for the requested steps.
MAX_USEFUL_SIGMA = 50.0


@dataclass
class PrivatePlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    target_epsilon: float | None
    mechanism: object = None          # a dpkern.mechanisms.LMOMechanism for lmo-dp, else None
    details: dict = field(default_factory=dict)

    @property
    def certified(self) -> bool:
        return self.mechanism is None or bool(self.mechanism.certified)

    def describe(self, cfg: FinetuneConfig) -> str:
        """One line for the log: the noise and how it was calibrated."""
        if self.mechanism is None:
            how = (f"calibrated by the {cfg.accountant} accountant" if self.target_epsilon
                   is not None else "given")
            return (f"σ={self.noise_multiplier:.4f} {how} for q={self.sample_rate:.5f}, "
                    f"{self.steps} steps, C={cfg.max_grad_norm}, δ={cfg.delta:g}")
        d = self.details
        if self.target_epsilon is None:
            how = (f"LMO-DP noise {cfg.lmo_params} given ({self.mechanism.params}, noise std "
                   f"{d['noise_std']:.4g} per coordinate), {d['accounting']} ε "
                   f"{d['planned_epsilon']:.4g} planned")
        else:
            how = (f"LMO-DP noise (u scaled by {d['scale']:.4g}, noise std {d['noise_std']:.4g} "
                   f"per coordinate) calibrated to the {d['accounting']} ε")
        return (how + f" for q={self.sample_rate:.5f}, {self.steps} steps, C={cfg.max_grad_norm}, "
                f"δ={cfg.delta:g}"
                + ("" if self.certified else " — ε NOT CERTIFIED (LMO-DP's own accounting"
                   + (", MGF evaluated as the artifact does" if self.mechanism.mgf_domain ==
                      "artifact" else "") + ")"))

    def report(self, cfg: FinetuneConfig, steps_done: int, epsilon: float | None, n_train: int,
               engine=None, noise_steps: int | None = None) -> dict:
        """The privacy report written to privacy.json (what the numbers mean is in the README)."""
        rep = engine.get_epsilon_report(cfg.delta) if engine is not None else None
        out = {
            "private": True,
            "epsilon": epsilon,
            "delta": cfg.delta,
            "epsilon_certified": self.certified,
            "epsilon_label": rep.label if rep is not None else None,
            "accountant": cfg.accountant if self.mechanism is None else
            f"LMO-DP {self.mechanism.accounting}",
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier if self.mechanism is None else None,
            "noise_std_per_coordinate": (self.noise_multiplier * cfg.max_grad_norm
                                         if self.mechanism is None else self.details["noise_std"]),
            "max_grad_norm": cfg.max_grad_norm,
            "clipping": cfg.clipping,
            "sample_rate": self.sample_rate,
            "expected_batch_size": cfg.batch_size,
            "steps": steps_done,
            "train_rows": n_train,
            "sampling": "Poisson (each row joins each step's batch with probability q)",
            "unit": "one training row (one text with its label, or one line for causal-LM); "
                    "add/remove-one adjacency",
            "method": cfg.method,
            "secure_mode": cfg.secure_mode,
            "noise_steps": noise_steps if noise_steps is not None else
            getattr(engine and engine.optimizer, "noise_steps", None),
            "not_covered": "dev-set model selection touches only the dev rows, never the "
                           "training rows; the logged train loss is a non-private diagnostic",
        }
        if self.mechanism is not None:
            m = self.mechanism
            out["mechanism"] = {"name": "lmo-dp", "params": m.params.as_dict(),
                                "lmo_params": cfg.lmo_params,
                                "scale_of_paper_default": self.details["scale"],
                                "accounting": m.accounting}
            if rep is not None and not m.certified:  # the paper's one-step ε and Gaussian swap
                out["mechanism"].update(mgf_domain=m.mgf_domain, **{
                    k: rep.details[k] for k in ("eps_lmo", "order", "sigma_eq")})
            if not m.certified:  # the same noise's certified ε, beside the paper's number
                done = out["noise_steps"] if out["noise_steps"] is not None else steps_done
                cert = m.certified_epsilon(sample_rate=self.sample_rate, steps=done,
                                           delta=cfg.delta)
                out["certified_epsilon_same_noise"] = cert.epsilon
                out["warning"] = ("epsilon is LMO-DP's reported value, NOT a certified guarantee "
                                  "(see dpkern/mechanisms/README.md); certified_epsilon_same_noise "
                                  "is a proven bound for the noise this run added")
        return out


def calibrate(cfg: FinetuneConfig, n_train: int, steps: int) -> PrivatePlan:
    """σ for the run (given, or the smallest σ whose ε(δ) ≤ target: never overshoots)."""
    from dpkern.accounting import get_noise_multiplier

    if cfg.batch_size > n_train:
        raise FinetuneError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training rows "
                            "(the sampling rate q = batch/N must be <= 1)")
    q = cfg.batch_size / n_train
    if cfg.delta >= 1.0 / n_train:
        raise FinetuneError(f"--delta {cfg.delta:g} is not below 1/N = {1.0 / n_train:.3g}: such a "
                            "δ allows releasing a whole row; use a smaller --delta")
    if cfg.method == "lmo-dp":
        return calibrate_lmo(cfg, q, steps)
    if cfg.noise_multiplier is not None:
        return PrivatePlan(float(cfg.noise_multiplier), q, steps, None)
    try:
        sigma = get_noise_multiplier(cfg.epsilon, cfg.delta, q, steps, accountant=cfg.accountant,
                                     sigma_max=MAX_USEFUL_SIGMA)
    except ValueError as e:
        raise FinetuneError(
            f"--epsilon {cfg.epsilon:g}: impossible budget for {steps} steps at q = {q:.4g} "
            f"(δ = {cfg.delta:g}): it needs σ > {MAX_USEFUL_SIGMA:g}, noise that drowns any "
            f"signal. Use fewer --steps/--epochs, a smaller --batch-size, or a larger --epsilon. "
            f"({e})") from None
    if not math.isfinite(sigma) or sigma <= 0:
        raise FinetuneError(f"--epsilon {cfg.epsilon:g}: calibration gave σ = {sigma}")
    return PrivatePlan(sigma, q, steps, cfg.epsilon)


def _cached_lmo_class():
    """LMOMechanism whose certified ε reuses its per-step bound ρ(α) (a function of the noise
    parameters only, ~0.4 s to evaluate) across the run's steps; the same numbers as
    LMOMechanism.certified_epsilon (tests/cli compare them)."""
    import numpy as np

    from dpkern.mechanisms import LMOMechanism
    from dpkern.mechanisms import lmo_accountant as acct

    class CachedLMO(LMOMechanism):
        def certified_epsilon(self, *, sample_rate, steps, delta, max_order: int = 128):
            o = np.arange(2, int(max_order) + 1, dtype=np.float64)
            rho = self.__dict__.get("_rho")
            if rho is None or len(rho) != len(o):
                rho = self._rho = acct.certified_step_rdp(self.params, o)
            sub = acct.subsampled_rdp_upper(rho, sample_rate) * int(steps)
            eps, order = acct.rdp_to_epsilon(o, sub, delta)
            return acct.EpsilonReport(
                eps, delta, True, "certified upper bound (RDP, any model dimension)",
                {"order": order, "sample_rate": sample_rate, "steps": steps,
                 "gaussian_like_sigma": 1 / math.sqrt(self.params.second_moment_u())})

    return CachedLMO


def _lmo(cfg: FinetuneConfig, scale: float):
    """LMO-DP noise: the paper's default configuration with u (the inverse Laplace scale)
    multiplied by ``scale`` (a1, a3, a4 scaled), clip norm C, the run's accounting."""
    from dpkern.mechanisms import PAPER_DEFAULT
    base = PAPER_DEFAULT
    return _lmo_mechanism(cfg, replace(base, a1=base.a1 * scale, a3=base.a3 * scale,
                                       a4=base.a4 * scale))


def _lmo_mechanism(cfg: FinetuneConfig, params):
    """LMOMechanism with these params, clip norm C and the run's accounting (and MGF domain)."""
    LMOMechanism = _cached_lmo_class()
    if cfg.accept_uncertified_epsilon:
        return LMOMechanism(params, cfg.max_grad_norm, accounting="reported",
                            accept_uncertified_epsilon=True, mgf_domain=cfg.lmo_mgf_domain)
    return LMOMechanism(params, cfg.max_grad_norm, accounting="certified")


def fixed_lmo(cfg: FinetuneConfig, q: float, steps: int) -> PrivatePlan:
    """``--lmo-params``: the given noise, not calibrated; its ε over ``steps`` must be finite."""
    from dpkern.mechanisms import PAPER_DEFAULT, load_params
    try:
        params = load_params(cfg.lmo_params)
    except ValueError as e:
        raise FinetuneError(f"--lmo-params: {e}") from None
    mech = _lmo_mechanism(cfg, params)
    try:
        eps = float(mech.epsilon(sample_rate=q, steps=steps, delta=cfg.delta).epsilon)
    except ValueError:
        eps = math.inf
    if not math.isfinite(eps):
        raise FinetuneError(f"--lmo-params {cfg.lmo_params}: the {mech.accounting} ε of {params} "
                            f"is not finite at δ = {cfg.delta:g} (its MGF is undefined at every "
                            "order): this noise carries no guarantee")
    return PrivatePlan(0.0, q, steps, None, mechanism=mech,
                       details={"scale": 1.0 if params == PAPER_DEFAULT else None,
                                "noise_std": mech.noise_std(), "accounting": mech.accounting,
                                "planned_epsilon": eps})


_LMO_SCALES: dict = {}  # (target, δ, q, steps, C, accounting, MGF domain) -> scale (deterministic)


def calibrate_lmo(cfg: FinetuneConfig, q: float, steps: int, iters: int = 10) -> PrivatePlan:
    """The largest u-scale s (least noise) whose ε(δ) after ``steps`` is ≤ the target.

    ε grows with s (less noise); the search keeps ε(lo) ≤ target at every step, so the result
    never overshoots. s is bounded below where the noise's Gaussian-like σ = 1/(s·√E[u²]) reaches
    MAX_USEFUL_SIGMA: a target that needs more noise is an impossible budget.
    """
    from dpkern.mechanisms import PAPER_DEFAULT

    if cfg.lmo_params is not None:
        return fixed_lmo(cfg, q, steps)
    target = float(cfg.epsilon)
    key = (target, cfg.delta, q, steps, cfg.max_grad_norm, cfg.accept_uncertified_epsilon,
           cfg.lmo_mgf_domain)
    if key in _LMO_SCALES:
        return _lmo_plan(cfg, q, steps, _LMO_SCALES[key])

    def eps(s: float) -> float:
        try:
            return float(_lmo(cfg, s).epsilon(sample_rate=q, steps=steps, delta=cfg.delta).epsilon)
        except ValueError:  # no finite ε at any order (too little noise)
            return math.inf

    lo = 1.0 / (MAX_USEFUL_SIGMA * math.sqrt(PAPER_DEFAULT.second_moment_u()))
    e_lo = eps(lo)
    if not e_lo <= target:
        raise FinetuneError(
            f"--epsilon {target:g}: impossible budget for lmo-dp over {steps} steps at q = {q:.4g} "
            f"(δ = {cfg.delta:g}): even noise as strong as a Gaussian of σ = {MAX_USEFUL_SIGMA:g} "
            f"spends ε = {e_lo:.3g}. Use fewer --steps/--epochs, a smaller --batch-size, or a "
            "larger --epsilon.")
    hi = lo
    while True:  # bracket: ε(lo) <= target < ε(hi)
        hi *= 4.0
        if hi > 1e6:
            break
        if not eps(hi) <= target:
            break
        lo = hi
    if hi <= 1e6:
        for _ in range(iters):
            mid = math.sqrt(lo * hi)
            if eps(mid) <= target:
                lo = mid
            else:
                hi = mid
    _LMO_SCALES[key] = lo
    return _lmo_plan(cfg, q, steps, lo)


def _lmo_plan(cfg: FinetuneConfig, q: float, steps: int, scale: float) -> PrivatePlan:
    mech = _lmo(cfg, scale)
    return PrivatePlan(0.0, q, steps, float(cfg.epsilon), mechanism=mech,
                       details={"scale": scale, "noise_std": mech.noise_std(),
                                "accounting": mech.accounting})
