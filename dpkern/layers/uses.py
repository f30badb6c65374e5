"""What one use of a private parameter leaves for after the backward, and what is done with it.

A *use* is one application of a parameter in the forward pass. Three kinds cover every supported
layer, and a parameter may have several uses (a tied embedding / lm_head, a layer called twice):

* ``LinearUse(a, g)``: the parameter's gradient is Σ_t g_tᵀ a_t, a (B, T, d), g (B, T, p). Linear
  weights; Hugging Face Conv1D weights with the roles of a and g swapped (its weight is (d, p)).
* ``EmbeddingUse(ids, g, padding_idx)``: gradient rows ids[t] += g_t; ids (B, T), g (B, T, d).
* ``PerSampleUse(grads)``: the per-sample gradients themselves, (B, *param.shape) fp32, for cheap
  parameters (biases, LayerNorm / RMSNorm weights) where instantiating them costs O(B·d).

Uses of one kind add up by concatenation along T (exact), so a parameter's per-sample norm is
‖Σ uses‖² with one call per kind, plus the tied cross term 2⟨E_i, H_i⟩ when an embedding and a
linear use share the weight. Other mixes are refused when the model is wrapped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dpkern.ops._persample import FLOAT_DTYPES, SharedItems, layout_key
from dpkern.ops.bookkeeping import bookkeeping_wgrad
from dpkern.ops.embedding_norm import embedding_norm_sq, tied_cross_term
from dpkern.ops.linear_norm import linear_norm_sq, linear_norm_sq_grouped
from dpkern.ops.rownorm import rownorm_sq, rownorm_sq_many


@dataclass
class LinearUse:
    a: torch.Tensor  # (B, T, d)
    g: torch.Tensor  # (B, T, p)
    path: str

    def zero_samples(self, keep: torch.Tensor) -> "LinearUse":
        m = keep.view(-1, 1, 1)
        return LinearUse(torch.where(m, self.a, 0), torch.where(m, self.g, 0), self.path)


@dataclass
class EmbeddingUse:
    ids: torch.Tensor  # (B, T) int
    g: torch.Tensor  # (B, T, d)
    padding_idx: int | None
    path: str

    def zero_samples(self, keep: torch.Tensor) -> "EmbeddingUse":
        return EmbeddingUse(self.ids, torch.where(keep.view(-1, 1, 1), self.g, 0),
                            self.padding_idx, self.path)


@dataclass
class PerSampleUse:
    grads: torch.Tensor  # (B, *param.shape), fp32 or wider
    path: str

    def zero_samples(self, keep: torch.Tensor) -> "PerSampleUse":
        m = keep.view(-1, *([1] * (self.grads.dim() - 1)))
        return PerSampleUse(torch.where(m, self.grads, 0), self.path)


USE_KINDS = (LinearUse, EmbeddingUse, PerSampleUse)


def batch_size(use) -> int:
    return (use.a if isinstance(use, LinearUse) else
            use.g if isinstance(use, EmbeddingUse) else use.grads).shape[0]


def backward_batch_size(uses_by_param: dict, params: list) -> int:
    """The batch size every use of `params` saw in one backward pass (0 when there is no use).

    Raises RuntimeError, naming the layers, when the uses disagree on it, or when a Linear or
    Embedding use carries an output gradient the per-sample kernels do not take (float64: a model
    cast after make_private, which refuses such layers up front). One pass over the uses; the
    messages are built only on failure (this runs every backward)."""
    sizes, wide = set(), False
    for p in params:
        for u in uses_by_param[p]:
            t = u.grads if type(u) is PerSampleUse else u.g
            sizes.add(t.shape[0])
            wide = wide or (t.dtype not in FLOAT_DTYPES and type(u) is not PerSampleUse)
    if wide:
        bad = sorted({f"{u.path} ({u.g.dtype})" for p in params for u in uses_by_param[p]
                      if type(u) is not PerSampleUse and u.g.dtype not in FLOAT_DTYPES})
        raise RuntimeError(f"layers {', '.join(bad)}: the per-sample kernels take float32, "
                           "bfloat16 and float16 Linear / Embedding gradients; cast the model "
                           "back (model.float())")
    if len(sizes) > 1:
        seen = sorted({(batch_size(u), u.path) for p in params for u in uses_by_param[p]})
        raise RuntimeError("layers saw different batch sizes in one backward pass ("
                           + ", ".join(f"{w}: {b}" for b, w in seen) + "); the engine needs every "
                           "supported layer's input to keep the batch on dim 0")
    return next(iter(sizes)) if sizes else 0


def _split(uses):
    lin = [u for u in uses if isinstance(u, LinearUse)]
    emb = [u for u in uses if isinstance(u, EmbeddingUse)]
    per = [u for u in uses if isinstance(u, PerSampleUse)]
    if per and (lin or emb):
        raise RuntimeError(f"a parameter is shared between layers of unsupported kinds "
                           f"({', '.join(u.path for u in uses)})")
    return lin, emb, per


def _cat_t(tensors):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def _per_sample_rows(per: list) -> torch.Tensor:
    """(B, n) per-sample gradients of a parameter with PerSampleUses only, summed over its uses."""
    total = per[0].grads if len(per) == 1 else sum(u.grads for u in per)
    return total.reshape(total.shape[0], -1)


def param_norm_sq(uses: list, *, backend: str | None = None) -> torch.Tensor:
    """Per-sample squared norm (B,) fp32 of a parameter's gradient summed over all its uses."""
    lin, emb, per = _split(uses)
    if per:
        flat = _per_sample_rows(per)
        if flat.dtype == torch.float64:  # rownorm_sq takes fp32 / half types
            return flat.square().sum(dim=1)
        return rownorm_sq(flat, backend=backend)
    out = None
    if lin:
        a, g = _cat_t([u.a for u in lin]), _cat_t([u.g for u in lin])
        out = linear_norm_sq(a, g, backend=backend)
    if emb:
        pads = {u.padding_idx for u in emb}
        if len(pads) > 1:
            raise RuntimeError(f"embedding uses of one weight disagree on padding_idx "
                               f"({', '.join(u.path for u in emb)})")
        ids, ge = _cat_t([u.ids for u in emb]), _cat_t([u.g for u in emb])
        e = embedding_norm_sq(ids, ge, padding_idx=emb[0].padding_idx, backend=backend)
        out = e if out is None else out + e
        if lin:  # tied weight: ‖E + H‖² = ‖E‖² + ‖H‖² + 2⟨E, H⟩
            out = out + 2.0 * tied_cross_term(ids, ge, a, g, padding_idx=emb[0].padding_idx,
                                              backend=backend)
    return out


def input_key(a: torch.Tensor) -> tuple:
    """Linear uses with equal keys read the very same input tensor (q/k/v, gate/up): the same
    memory, seen with the same layout."""
    return (a.data_ptr(),) + layout_key(a)


class LinearInputs:
    """The LinearUses of one backward's `params`, grouped by the input they read (input_key:
    q/k/v, gate/up read one tensor), each group's items frozen as SharedItems. norms_sq and the
    release bounds' Linear sums (bounds._linear_sums) both take these groups: the inputs' keys
    and every tensor's layout are read once per backward, not once per op."""

    def __init__(self, uses_by_param: dict, params: list):
        groups: dict = {}
        self.all_single = True  # every Linear parameter has exactly one use
        for p in params:
            us = uses_by_param[p]
            for u in us:
                if isinstance(u, LinearUse):
                    groups.setdefault(input_key(u.a), []).append((p, u))
                    self.all_single = self.all_single and len(us) == 1
        self.groups = list(groups.values())  # [[(param, use), ...]] in order of first use
        self.items = SharedItems((g[0][1].a, [u.g for _, u in g]) for g in self.groups)


def norms_sq(uses_by_param: dict, params: list, *, backend: str | None = None,
             linear: LinearInputs | None = None) -> list:
    """param_norm_sq for each of `params`; Linear layers that read one input tensor (q/k/v,
    gate/up) share one Gram computation, and layers of one layout share one launch
    (linear_norm_sq_grouped). linear: the LinearInputs of (uses_by_param, params), when the caller
    has them."""
    out: dict = {}
    rows, rows_params = [], []  # norm / bias weights: their rows' norms in one launch
    for p in params:
        uses = uses_by_param[p]
        if len(uses) == 1 and isinstance(uses[0], LinearUse):
            continue  # grouped below
        if all(isinstance(u, PerSampleUse) and u.grads.dtype != torch.float64 for u in uses):
            rows.append(_per_sample_rows(uses))
            rows_params.append(p)
        else:
            out[p] = param_norm_sq(uses, backend=backend)
    out.update(zip(rows_params, rownorm_sq_many(rows, backend=backend)))
    linear = linear if linear is not None else LinearInputs(uses_by_param, params)
    if linear.all_single:
        groups, items = [[p for p, _ in g] for g in linear.groups], linear.items
    else:  # the single-use parameters' Linear uses (the others were normed above)
        groups = [[p for p, _ in g if len(uses_by_param[p]) == 1] for g in linear.groups]
        items = [(linear.items[k][0], [uses_by_param[p][0].g for p in g])
                 for k, g in enumerate(groups) if g]
        groups = [g for g in groups if g]
    res = linear_norm_sq_grouped(items, backend=backend)
    for group, r in zip(groups, res):
        out.update(zip(group, r))
    return [out[p] for p in params]


def bookkeep(uses: list, scale: torch.Tensor, out: torch.Tensor | None, *,
             backend: str | None = None) -> torch.Tensor:
    """out += Σ_i scale_i · (per-sample gradient of sample i), over all uses; fp32 accumulation.

    scale: (B,) float32; out: the parameter's fp32 accumulator (param.shape), or None when the
    first use is a LinearUse (it then writes a new accumulator directly, saving a zero fill and an
    addition). Returns the accumulator.
    """
    for u in uses:
        if isinstance(u, LinearUse):
            if out is None:
                out = bookkeeping_wgrad(u.a, u.g, scale, backend=backend)
            else:
                bookkeeping_wgrad(u.a, u.g, scale, out=out, accumulate=True, backend=backend)
            continue
        if out is None:
            raise ValueError("bookkeep: out=None needs a LinearUse first")
        if isinstance(u, EmbeddingUse):
            ids = u.ids.reshape(-1)
            rows = (u.g.to(out.dtype) * scale.to(out.dtype).view(-1, 1, 1)).reshape(ids.numel(), -1)
            if u.padding_idx is not None:
                # exact zeros into the padding row, not a boolean selection (a host-GPU sync)
                rows = torch.where((ids != u.padding_idx).unsqueeze(1), rows, 0.0)
            out.index_add_(0, ids, rows)
        else:
            g = u.grads.reshape(u.grads.shape[0], -1)
            out.add_(scaled_row_sums(g.unsqueeze(0), scale.to(g.dtype).unsqueeze(0))
                     .view(out.shape).to(out.dtype))
    return out


def scaled_row_sums(g: torch.Tensor, scales: torch.Tensor,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i s_li g_li: g (L, B, n) per-sample rows, scales (L, B) in g's dtype -> (L, n).

    Elementwise products and a sum over samples, never a matmul: under the user's TF32 setting a
    matmul may round the scales and the rows to 10 mantissa bits, rounding a sample's contribution
    above c_i ‖g_i‖ by up to 2⁻¹⁰ relative, past the bound the clip factor was taken from. With
    `keep` (B,) bool, samples where it is False contribute exact zeros (their factor is 0, but
    0·NaN = NaN)."""
    prod = g * scales.unsqueeze(2)
    if keep is not None:
        prod = torch.where(keep.view(1, -1, 1), prod, 0.0)
    return prod.sum(dim=1)


def stacked(xs: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.stack(xs).to(dtype), or an expanded view when every entry is one tensor (flat
    clipping: one factor for all parameters)."""
    x0 = xs[0]
    if all(x is x0 for x in xs):
        return x0.to(dtype or x0.dtype).unsqueeze(0).expand(len(xs), *x0.shape)
    return torch.stack(xs).to(dtype or x0.dtype)


class PerSampleRows:
    """The parameters whose one use is a PerSampleUse of fp32 per-sample gradients (norm weights,
    biases), their (B, n) rows stacked per (n, device): one (L, B, n) tensor per width. Their bound
    terms and their book-keeping then take a few launches per width instead of a few per
    parameter (a 1B Llama has 33 norm weights)."""

    def __init__(self, uses_by_param: dict, params: list):
        groups: dict = {}
        for p in params:
            us = uses_by_param[p]
            if (len(us) == 1 and isinstance(us[0], PerSampleUse)
                    and us[0].grads.dtype == torch.float32 and us[0].grads.dim() >= 1
                    and us[0].grads.shape[0] > 0):
                g = us[0].grads
                groups.setdefault((g[0].numel(), g.device), []).append(p)
        self.groups = []  # [(params, (L, B, n) rows)]
        for (n, _), ps in groups.items():
            bsz = uses_by_param[ps[0]][0].grads.shape[0]
            self.groups.append((ps, torch.stack([uses_by_param[p][0].grads.reshape(bsz, n)
                                                 for p in ps])))
        self.params = {p for ps, _ in self.groups for p in ps}

    def __contains__(self, p) -> bool:
        return p in self.params

    def norms64(self) -> list:
        """[(params, (L, B) fp64 ‖g_i‖ of their fp32 rows)] per width: the release bounds'
        sqrt(Q) terms (bounds._sqrt_q of a PerSampleUse), one tensor per width."""
        return [(ps, torch.linalg.vector_norm(g, dim=2, dtype=torch.float64))
                for ps, g in self.groups]

    def bookkeep(self, scales: dict, keep: torch.Tensor) -> dict:
        """{p: Σ_i scales[p]_i g_i} fp32 of shape p.shape (views of one (L, n) tensor per width)
        for every parameter held, samples with keep False contributing zeros."""
        out = {}
        for ps, g in self.groups:
            sums = scaled_row_sums(g, stacked([scales[p] for p in ps], torch.float32), keep)
            out.update((p, acc.view(p.shape)) for p, acc in zip(ps, sums.unbind(0)))
        return out
