"""PrivacyEngine: Opacus-shaped make_private with book-keeping clipping (flow: engine_README.md).

    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    for batch in loader:
        per_sample_losses(model, batch).mean().backward()
        optimizer.step(); optimizer.zero_grad()
    engine.get_epsilon(delta=1e-5)
"""
from __future__ import annotations

import math
import warnings

import torch
from torch.utils.data import DataLoader

from dpkern import _alloc
from dpkern.backend import requested_backend
from dpkern.data.poisson import DPDataLoader, secret_generator
from dpkern.engine.tape import GradTape
from dpkern.layers import wrap_model
from dpkern.layers.bounds import release_bound_matrix
from dpkern.layers.uses import (LinearInputs, LinearUse, PerSampleRows, backward_batch_size,
                                bookkeep, norms_sq)
from dpkern.ops.bookkeeping import bookkeeping_wgrad_grouped
from dpkern.ops.tensor_norms import scale_many_, sumsq_many
from dpkern.optim.clipping import check_clipping, clip_factors, round_down_f32
from dpkern.optim.dp_optimizer import DPOptimizer

__all__ = ["PrivacyEngine"]


def _refuse_low_precision_mean(uses: dict, params: list) -> None:
    """loss_reduction='mean' divides every output gradient by the realized batch size B, and the
    per-sample ops then see it rounded coarser than fp32: stored in bf16/fp16, or fp32 rounded to
    TF32 by the sensitivity-exact "tf32r" mode (the GPU default). B differs between neighbouring
    datasets, so every OTHER sample's reconstructed gradient (and clipped direction) moves by up to
    one ulp of that format: the sum's sensitivity grows with the batch (measured on an H100: 1.1e-4 C
    for a zeroed extra sample in fp32/tf32r; 1e-3 C with 3 samples in bf16). With
    loss_reduction='sum' the output gradients do not depend on B and the bound holds exactly."""
    from dpkern.ops._persample import fp32_mode
    for p in params:
        for u in uses[p]:
            g = getattr(u, "g", None)
            if g is None:
                continue
            why = None
            if g.dtype in (torch.bfloat16, torch.float16):
                why = f"{g.dtype} output gradients"
            elif g.dtype == torch.float32 and g.is_cuda and fp32_mode(g.device) == "tf32r":
                why = "fp32 output gradients rounded to TF32 by the per-sample ops (fp32 mode tf32r)"
            if why:
                raise RuntimeError(
                    f"loss_reduction='mean' with {why} (layer {u.path}) would break the "
                    "sensitivity bound: the 1/B_realized of the mean is rounded into every sample's "
                    "gradient, and B_realized differs between neighbouring batches. Use "
                    "make_private(..., loss_reduction='sum') and loss = per_sample_losses.sum(); the "
                    "optimizer then sees the sum of clipped gradients + noise (Adam is unaffected; "
                    "scale an SGD learning rate by 1/expected_batch_size)"
                    + (", or IEEE fp32 dots (DPKERN_NORM_FP32_DOT=ieee, slower)"
                       if g.dtype == torch.float32 else "") + ".")


class _LastClip(dict):
    """{parameter name: (N̂² fp64, U)} of the last backward, the loss scaling applied on read (the
    fp64 copies are made only when someone looks)."""

    def __init__(self, raw: dict, s2: float):
        super().__init__(raw)
        self._s2 = s2

    def __getitem__(self, key):
        n, u = super().__getitem__(key)
        return n.double() * self._s2, u

    def get(self, key, default=None):  # dict.get would bypass __getitem__ (unscaled fp32)
        return self[key] if key in self else default

    def items(self):
        return [(k, self[k]) for k in self]

    def values(self):
        return [self[k] for k in self]


class _Clipper:
    """End of every backward pass: per-sample norms -> clip factors -> book-keeping into the DP
    optimizer's accumulators. Holds the tape's records only for the duration of the call."""

    def __init__(self, private: dict, clipping: str, max_grad_norm: float, per_param: list | None,
                 loss_reduction: str, gamma: float, backend: str | None):
        self.private = private
        self.clipping = clipping
        self.max_grad_norm = max_grad_norm
        self.per_param = dict(zip(private, per_param)) if per_param is not None else None
        self.loss_reduction = loss_reduction
        self.gamma = gamma
        self.backend = backend
        self.optimizer: DPOptimizer | None = None

    # B = 1 backward passes take the one-gradient path (_single_sample); False forces the general one
    single_sample_fast = True

    def __call__(self, uses: dict) -> None:
        opt = self.optimizer
        params = [p for p in self.private if p in uses]
        bsz = backward_batch_size(uses, params)
        if bsz == 0:
            opt.note_backward(0)
            return
        if self.loss_reduction == "mean":
            _refuse_low_precision_mean(uses, params)
        each = opt.sum_each_param  # sharded optimizers reduce each sum as soon as it is written
        if bsz == 1 and self.single_sample_fast and not each:
            return self._single_sample(uses, params)
        # loss = mean_i ℓ_i gives output grads ∇ℓ_i / B: the true per-sample gradient is B times.
        s = float(bsz) if self.loss_reduction == "mean" else 1.0
        # Norm weights and biases (one fp32 per-sample use each) that this optimizer releases:
        # bound terms and sums per width (the others take the per-parameter path).
        rows = PerSampleRows(uses, [p for p in params if p in opt.params]) if not each else None
        linear = LinearInputs(uses, params)  # read by the norms and by the bounds' sums
        norms = norms_sq(uses, params, backend=self.backend, linear=linear)
        bounds = release_bound_matrix(uses, params, norms, backend=self.backend, rows=rows,
                                      linear=linear)
        linear = None
        if s != 1.0:
            bounds = bounds * s
        per_param = [self.per_param[p] for p in params] if self.per_param else None
        factors, finite = clip_factors(bounds, self.clipping, self.max_grad_norm, per_param,
                                       self.gamma)
        # No host sync here: the count of non-finite samples stays on the device until read.
        n_bad = bsz - finite.sum()
        opt.last_clip = _LastClip({self.private[p]: (n, u)
                                   for p, n, u in zip(params, norms, bounds.unbind(0))}, s * s)
        scales, opt.last_scales = {}, {}
        linear, linear_params = [], []  # one-Linear-use parameters: book-kept in grouped launches
        row_scales = {}  # one-per-sample-use parameters: book-kept per width (rows.bookkeep)
        for p, c in zip(params, factors):
            p_uses = uses.pop(p)
            if p not in opt.params:
                continue
            sc = scales.get(id(c))
            if sc is None:  # c·s rounded down: the factor the book-keeping applies keeps c U ≤ C
                sc = scales[id(c)] = round_down_f32(c * s) if s != 1.0 else round_down_f32(c)
            opt.last_scales[self.private[p]] = sc
            if rows is not None and p in rows:
                row_scales[p] = sc
                continue
            # Non-finite samples have factor 0. Book-keeping of a Linear use gives a scale-0 sample
            # exactly nothing (even NaN/Inf rows); other uses multiply (0·NaN = NaN), so their
            # rows are zeroed, always: the control flow does not depend on the data.
            p_uses = [u if isinstance(u, LinearUse) else u.zero_samples(finite) for u in p_uses]
            acc = opt.summed.get(p)
            if acc is None and not isinstance(p_uses[0], LinearUse):
                acc = opt.accumulator(p)
            if len(p_uses) == 1 and isinstance(p_uses[0], LinearUse) and not each:
                linear.append((p_uses[0].a, p_uses[0].g, sc, acc, acc is not None))
                linear_params.append(p)
                continue
            opt.summed[p] = bookkeep(p_uses, sc, acc, backend=self.backend)
            if each:
                opt.param_summed(p)
        p_uses = None  # the grouped book-keeping frees each group's inputs once it is issued
        self._bookkeep_rows(rows, row_scales, finite)
        rows = None
        sums = bookkeeping_wgrad_grouped(linear, backend=self.backend, consume=True)
        opt.summed.update(zip(linear_params, sums))
        opt.note_backward(bsz, n_bad)

    def _bookkeep_rows(self, rows: PerSampleRows | None, row_scales: dict,
                       finite: torch.Tensor) -> None:
        """The sums of the parameters held in `rows` (scales by parameter) into the optimizer's
        accumulators, per width; non-finite samples contribute exact zeros (rows.bookkeep), as
        zero_samples gives."""
        if not row_scales:
            return
        opt = self.optimizer
        accs, adds = [], []
        for p, x in rows.bookkeep(row_scales, finite).items():
            acc = opt.summed.get(p)
            if acc is None:
                opt.summed[p] = x
            else:  # a second backward before the step (gradient accumulation)
                accs.append(acc)
                adds.append(x.to(acc.dtype))
        if accs:
            torch._foreach_add_(accs, adds)

    def _single_sample(self, uses: dict, params: list) -> None:
        """B = 1: the per-sample gradient is the batch gradient. Form it once (`_one_gradient`: a
        plain GEMM for fp32 Linear uses, book-keeping with scale 1 otherwise, grouped over the
        parameters with one 16-bit Linear use), take its norm from the very fp32 values that will
        be released, scale it in place. No norm kernels and no second pass over (a, g): clipping
        costs one read of the gradients for their norms (`sumsq_many`) and one read + write to
        scale them (`scale_many_`; a later backward of the same step scales into the earlier sums
        in that pass), each one launch for all fp32 gradients on the Triton backend.

        Bound: the release is fl(c·G) with G the fp32 gradient, so ‖release‖ ≤ c‖G‖(1 + 2⁻²⁴), and
        ‖G‖ ≤ N̂ (1 + (n+2)·2⁻⁵²) for N̂ = fl(√s), s the fp64 sum of the n squares of G's fp32
        entries (exact squares, summed in any order: relative error ≤ (n - 1)·2⁻⁵³)."""
        opt = self.optimizer
        ones: dict = {}

        def one(dev):  # the scale-1 tensor of a device
            t = ones.get(dev)
            if t is None:
                t = ones[dev] = torch.ones(1, dtype=torch.float32, device=dev)
            return t
        # One-Linear-use parameters with 16-bit operands: their gradients in grouped book-keeping
        # launches (scale 1), each bit for bit bookkeep's (fp32 ones stay a cuBLAS GEMM). Their
        # uses leave `uses` here, so each launch group's inputs are freed once it is issued.
        grouped, items = {}, []
        for p in params:
            p_uses = uses[p]
            u = p_uses[0]
            if len(p_uses) == 1 and isinstance(u, LinearUse) and u.a.dtype == u.g.dtype \
                    and u.a.dtype in (torch.float16, torch.bfloat16):
                del uses[p]
                grouped[p] = len(items)
                items.append((u.a, u.g, one(p.device), None, False))
        p_uses = u = None
        formed = bookkeeping_wgrad_grouped(items, backend=self.backend, consume=True)
        items = None
        grads = []
        for p in params:
            k = grouped.get(p)
            if k is not None:
                g, formed[k] = formed[k], None
            else:
                p_uses = uses.pop(p)
                acc = None
                if not isinstance(p_uses[0], LinearUse):
                    acc = torch.zeros(p.shape, dtype=torch.float64 if p.dtype == torch.float64
                                      else torch.float32, device=p.device)
                g = _one_gradient(p_uses, one(p.device), acc, self.backend)
            grads.append(g)
        p_uses = g = None
        sumsq = sumsq_many(grads, backend=self.backend)  # (K,) fp64
        slack = _alloc.device_constants(
            [(1.0 + (x.numel() + 2) * 2.0 ** -52) * (1.0 + 2.0 ** -23) for x in grads],
            sumsq.device, torch.float64)
        bounds = (sumsq.sqrt() * slack).view(-1, 1)  # (K, B = 1)
        per_param = [self.per_param[p] for p in params] if self.per_param else None
        factors, finite = clip_factors(bounds, self.clipping, self.max_grad_norm, per_param,
                                       self.gamma)
        opt.last_clip = _LastClip({self.private[p]: (n, u) for p, n, u in
                                   zip(params, sumsq.view(-1, 1).unbind(0), bounds.unbind(0))},
                                  1.0)
        opt.last_scales = {}
        flat = all(c is factors[0] for c in factors)  # flat / automatic: one factor for all
        one_sc = round_down_f32(factors[0]) if flat else None
        # First sums of this step are scaled in place and kept; later ones (gradient
        # accumulation) are scaled into the sums of the earlier backwards in the same pass.
        # Dropped (non-finite) samples give exact zeros, NaN / Inf entries included.
        kept = [k for k, p in enumerate(params) if p in opt.params]
        parts = [[k for k in kept if params[k] not in opt.summed],
                 [k for k in kept if params[k] in opt.summed]]
        for first, ks in zip((True, False), parts):
            if not ks:
                continue
            if flat:
                sc, rows = one_sc, [one_sc] * len(ks)
            else:
                sc = round_down_f32(torch.cat([factors[k] for k in ks]))
                rows = list(sc.view(-1, 1).unbind(0))
            for k, row in zip(ks, rows):
                opt.last_scales[self.private[params[k]]] = row
            released = [grads[k] for k in ks]
            if first:
                scale_many_(released, sc, finite, backend=self.backend)
                opt.summed.update((params[k], g) for k, g in zip(ks, released))
            else:
                scale_many_(released, sc, finite, backend=self.backend,
                            add_to=[opt.summed[params[k]] for k in ks])
        opt.note_backward(1, 1 - finite.sum())


ENGINE_BACKENDS = ("auto", "triton", "torch")


def _check_engine_backend(name, what: str) -> None:
    """The engine's per-sample ops (norms, book-keeping, the B = 1 passes) run on Triton or on
    torch; the CUDA C++ backend has only the row norms. Refused before anything is built, where
    it would otherwise fail at the first backward."""
    if name not in ENGINE_BACKENDS:
        raise ValueError(f"{what} must be one of {ENGINE_BACKENDS} for the DP engine, got "
                         f"{name!r}" + (" (the 'cuda' backend has only the row-norm op)"
                                        if name == "cuda" else ""))


def _one_gradient(uses: list, one: torch.Tensor, acc, backend) -> torch.Tensor:
    """B = 1: a parameter's gradient G itself, fp32. fp32 Linear uses run as a plain GEMM (cuBLAS
    on a GPU, under the user's TF32 setting, as autograd's own weight gradient would): the clip
    bound is taken from the fp32 values of G that are released, so how G was computed does not
    enter it. Other uses (16-bit operands, embeddings, per-sample) go through the book-keeping."""
    out = acc
    for u in uses:
        if isinstance(u, LinearUse) and u.a.dtype == u.g.dtype == torch.float32:
            if out is None:
                out = torch.matmul(u.g[0].t(), u.a[0])
            else:
                out.addmm_(u.g[0].t().to(out.dtype), u.a[0].to(out.dtype))
        else:
            out = bookkeep([u], one, out, backend=backend)
    return out


class PrivacyEngine:
    """DP-SGD for PyTorch / Hugging Face models, Opacus-compatible.

    Args:
        accountant: "prv" (tight, default), "rdp", "gdp" (approximate) or "edgeworth".
        secure_mode: refuse explicit seeds (noise and sampling seeds come from os.urandom).
        backend: "auto" | "triton" | "torch" for the per-sample ops (default: DPKERN_BACKEND).
    """

    def __init__(self, accountant: str = "prv", secure_mode: bool = False, *,
                 backend: str | None = None):
        from dpkern.accounting import create_accountant
        self.accountant_name = accountant
        self.accountant = create_accountant(accountant)
        self.secure_mode = bool(secure_mode)
        if backend is not None:
            _check_engine_backend(backend, "backend")
        self.backend = backend
        self.sample_rate: float | None = None
        self.mechanism = None
        self.optimizer: DPOptimizer | None = None
        self.sampling_generator: torch.Generator | None = None  # the Poisson loader's
        self._config: dict = {}  # what a checkpoint must agree on (checkpoint.engine_config)

    # Subclasses (dpkern.subspace) may swap the end-of-backward clipper and the DP optimizer.
    clipper_class = _Clipper
    optimizer_class = DPOptimizer

    def make_private(self, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     data_loader: DataLoader | None, noise_multiplier: float, max_grad_norm,
                     poisson_sampling: bool = True, clipping: str = "flat",
                     loss_reduction: str = "mean", expected_batch_size: int | None = None,
                     sample_rate: float | None = None, grad_postprocessors: list | None = None,
                     automatic_gamma: float = 0.01, seed: int | None = None,
                     batch_first: bool = True, grad_sample_mode: str | None = None,
                     mechanism=None, average_sum: bool = False):
        """Make `module` + `optimizer` private; returns (module, DPOptimizer, data loader).

        Args:
            module: the model; supported layers are wrapped in place (the same object comes back).
            optimizer: any torch optimizer over (a subset of) the module's trainable parameters.
            data_loader: with poisson_sampling, replaced by a DPDataLoader with sample rate
                q = batch_size / len(dataset). None is allowed with expected_batch_size and
                sample_rate given (you then sample and report empty batches yourself).
            noise_multiplier: σ >= 0; noise std on every coordinate is σC (σC/B_expected after
                averaging).
            max_grad_norm: C > 0; with clipping="per_layer" also a list, one C_k per private
                parameter in model order (C = ‖(C_k)‖).
            clipping: "flat" | "per_layer" | "automatic" (c_i = C / (‖G_i‖ + automatic_gamma)).
            loss_reduction: "mean" (the loss is the mean of per-sample losses of the batch or
                micro-batch) or "sum".
            expected_batch_size: the public normaliser B_expected (the logical batch size);
                default data_loader.batch_size. Fixed here, never recomputed.
            grad_postprocessors: callables f(grads: dict[name, Tensor], noise_std: float) applied
                in place to the noisy averaged gradients before the inner optimizer's step.
            seed: fixed seed for sampling and noise (tests; refused in secure_mode).
            batch_first: must be True (the batch is dim 0 of every layer input).
            grad_sample_mode: accepted for Opacus compatibility and ignored (dpkern always uses
                book-keeping).
            average_sum: with loss_reduction="sum", divide the released sum (clipped gradients +
                noise) by the expected batch size: the update of "mean" without the realized
                batch size rounded into the gradients (required under bf16 / GPU tf32r).
            mechanism: a dpkern.mechanisms.Mechanism with clip_norm = C (default: Gaussian with
                noise_multiplier). A GaussianMechanism is the default path (fused step, the
                engine's accountant). An LMOMechanism draws its noise inside the same fused
                noise + update step where that step runs (SGD / AdamW; else its own noise launch
                and the inner optimizer) and is accounted by its own epsilon(): certified with
                accounting="certified", or LMO-DP's reported, uncertified number only with its
                explicit opt-in; get_epsilon_report() carries the label.
        """
        mechanism = self._check_mechanism(mechanism, noise_multiplier, max_grad_norm)
        if mechanism is not None and mechanism.name == "gaussian":
            noise_multiplier, mechanism = mechanism.noise_multiplier, None
        if not batch_first:
            raise ValueError("batch_first=False is not supported: put the batch on dim 0")
        if noise_multiplier is None and mechanism is not None:
            noise_multiplier = 0.0  # the mechanism adds the noise
        try:
            sigma = float(noise_multiplier)
        except (TypeError, ValueError):
            raise ValueError(f"noise_multiplier must be a number, got {noise_multiplier!r}") from None
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if average_sum and loss_reduction != "sum":
            raise ValueError("average_sum=True needs loss_reduction='sum' ('mean' already divides)")
        if seed is not None and self.secure_mode:
            raise ValueError("seed: explicit seeds are not allowed with secure_mode=True")
        if self.backend is None:  # the environment's choice, read by every per-sample op
            _check_engine_backend(requested_backend(), "the environment variable DPKERN_BACKEND")
        self._check_optimizer(module, optimizer)
        n_private = len({p for p in module.parameters() if p.requires_grad})
        total_c, per_param = check_clipping(clipping, max_grad_norm, n_private)

        bsz = expected_batch_size
        if data_loader is not None:
            n_data = len(data_loader.dataset)
            if n_data == 0:
                raise ValueError("data_loader: the dataset is empty (no samples to train on)")
            bsz = bsz if bsz is not None else data_loader.batch_size
            if bsz is None:
                raise ValueError("expected_batch_size: the data_loader has no batch_size; pass it")
            sample_rate = sample_rate if sample_rate is not None else min(1.0, bsz / n_data)
        elif bsz is None or sample_rate is None:
            raise ValueError("data_loader=None needs expected_batch_size= and sample_rate=")
        if int(bsz) <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {bsz}")

        clipper = self.clipper_class({}, clipping, total_c, None, loss_reduction, automatic_gamma,
                           self.backend)
        private = wrap_model(module, GradTape(clipper))
        clipper.private = private
        if per_param is not None:
            clipper.per_param = dict(zip(private, per_param))
        dp_opt = self.optimizer_class(optimizer, private_params=private, noise_multiplier=sigma,
                             max_grad_norm=total_c, expected_batch_size=int(bsz),
                             loss_reduction=loss_reduction, grad_postprocessors=grad_postprocessors,
                             secure_mode=self.secure_mode, seed=seed)
        clipper.optimizer = dp_opt
        dp_opt.mechanism = mechanism
        dp_opt.average_sum = bool(average_sum)
        self.mechanism = mechanism
        if data_loader is not None and poisson_sampling:
            gen = secret_generator(None if seed is None else seed + 1, secure_mode=self.secure_mode)
            data_loader = DPDataLoader.from_data_loader(data_loader, sample_rate=sample_rate,
                                                        generator=gen)
            self.sampling_generator = gen
            data_loader.add_batch_listener(dp_opt.signal_batch)
        elif data_loader is not None:
            warnings.warn("poisson_sampling=False: the accountant assumes Poisson sampling with "
                          f"q = {sample_rate:.4g}, which a shuffled loader does not give; the "
                          "reported epsilon is then not a guarantee")
        self.sample_rate = float(sample_rate)
        self.optimizer = dp_opt
        self._config = {"engine": type(self).__name__, "clipping": clipping,
                        "per_layer_max_grad_norm": None if per_param is None
                        else [float(c) for c in per_param],
                        "automatic_gamma": float(automatic_gamma) if clipping == "automatic"
                        else None, "poisson_sampling": bool(poisson_sampling)}
        q = self.sample_rate
        if mechanism is None:
            dp_opt.step_hooks.append(
                lambda opt: self.accountant.step(noise_multiplier=opt.noise_multiplier,
                                                 sample_rate=q))
        return module, dp_opt, data_loader

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon: float,
                                  target_delta: float, epochs: int, **kwargs):
        """make_private with σ calibrated so that `epochs` epochs spend at most target_epsilon
        (steps = epochs · round(1/q), q = batch_size / len(dataset)). Returns the same triple."""
        from dpkern.accounting import get_noise_multiplier
        bsz = kwargs.get("expected_batch_size") or data_loader.batch_size
        q = kwargs.get("sample_rate") or min(1.0, bsz / len(data_loader.dataset))
        steps = int(epochs) * max(1, round(1.0 / q))
        sigma = get_noise_multiplier(target_epsilon, target_delta, q, steps,
                                     accountant=self.accountant_name)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, **kwargs)

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at this δ, by the engine's accountant (or the mechanism's own account;
        see get_epsilon_report for what the number means)."""
        return float(self.get_epsilon_report(delta).epsilon)

    def get_epsilon_report(self, delta: float):
        """dpkern.mechanisms.EpsilonReport: ε, δ, whether it is certified, and its label (LMO-DP
        with accounting="reported": "as reported by LMO-DP, not certified")."""
        from dpkern.mechanisms import EpsilonReport
        if self.mechanism is None:
            return EpsilonReport(self.accountant.get_epsilon(delta), delta, True,
                                 f"certified ({self.accountant_name} accountant)", {})
        steps = self.optimizer.noise_steps if self.optimizer is not None else 0
        return self.mechanism.epsilon(sample_rate=self.sample_rate, steps=steps, delta=delta)

    # --- checkpoints (dpkern/engine/checkpoint.py) ---------------------------------------------
    def state_dict(self) -> dict:
        """The engine's own state: the accountant's history and the Poisson sampler's state (a
        SecretSampling's draw counter, never its key; a seeded torch.Generator's full state). The
        model and the DP optimizer (noise counter) have their own; save_checkpoint writes all
        three."""
        rng = self.sampling_generator
        return {"accountant": self.accountant.state_dict(),
                "sampling_rng": None if rng is None else rng.get_state()}

    def check_state_dict(self, state: dict) -> None:
        """Raises what load_state_dict(state) would refuse, changing nothing."""
        import copy
        if not isinstance(state, dict) or "accountant" not in state:
            raise ValueError("load_state_dict: not an engine state (no 'accountant' entry)")
        copy.deepcopy(self.accountant).load_state_dict(state["accountant"])
        rng = state.get("sampling_rng")
        if rng is not None:
            if self.sampling_generator is None:
                raise ValueError("load_state_dict: the state holds a Poisson sampler's generator "
                                 "and this engine has none (make_private with the data loader)")
            if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 \
                    or rng.numel() != self.sampling_generator.get_state().numel():
                raise ValueError("load_state_dict: sampling_rng is not a generator state of this "
                                 "engine's sampler")

    def load_state_dict(self, state: dict) -> None:
        self.check_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])
        if state.get("sampling_rng") is not None:
            self.sampling_generator.set_state(state["sampling_rng"])

    def save_checkpoint(self, *, path, module: torch.nn.Module, optimizer=None,
                        checkpoint_dict: dict | None = None):
        """Writes model, DP optimizer (inner state, release count, noise counter), accountant and
        sampler state to one file, atomically (temporary file, fsync, rename), with the DP
        configuration and a SHA-256 digest. Call between steps. Returns the path."""
        from dpkern.engine import checkpoint
        return checkpoint.save(self, path=path, module=module, optimizer=optimizer,
                               checkpoint_dict=checkpoint_dict)

    def load_checkpoint(self, *, path, module: torch.nn.Module, optimizer=None,
                        map_location="cpu", weights_only: bool = True) -> dict:
        """Restores what save_checkpoint wrote into this engine's model and DP optimizer (call
        make_private first, with the same arguments). Everything is checked before anything is
        loaded: a damaged file, another model, or another DP configuration (σ, C, q, B, clipping,
        accountant, ...) is refused with an error naming it, and nothing changes. Returns the
        checkpoint_dict given to save_checkpoint."""
        from dpkern.engine import checkpoint
        return checkpoint.load(self, path=path, module=module, optimizer=optimizer,
                               map_location=map_location, weights_only=weights_only)

    @staticmethod
    def _check_mechanism(mechanism, noise_multiplier, max_grad_norm):
        if mechanism is None:
            return None
        from dpkern.mechanisms import Mechanism
        if not isinstance(mechanism, Mechanism):
            raise TypeError(f"mechanism must be a dpkern.mechanisms.Mechanism, got "
                            f"{type(mechanism).__name__}")
        if isinstance(max_grad_norm, (list, tuple)) or float(max_grad_norm) != mechanism.clip_norm:
            raise ValueError(f"mechanism: its clip_norm {mechanism.clip_norm} must equal "
                             f"max_grad_norm {max_grad_norm!r} (the noise is calibrated to C)")
        if mechanism.name == "gaussian" and noise_multiplier is not None \
                and float(noise_multiplier) != mechanism.noise_multiplier:
            raise ValueError(f"noise_multiplier {noise_multiplier} disagrees with the mechanism's "
                             f"{mechanism.noise_multiplier}; pass one of them")
        return mechanism

    @staticmethod
    def _check_optimizer(module, optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if isinstance(optimizer, DPOptimizer):
            raise ValueError("optimizer is already a DPOptimizer; pass the original optimizer")
        own = {p for p in module.parameters()}
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if p not in own:
                    raise ValueError(f"optimizer: param_groups[{gi}]['params'][{pi}] (shape "
                                     f"{tuple(p.shape)}) is not a parameter of the module")
