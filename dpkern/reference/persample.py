"""Ground truth for the per-sample norm and book-keeping ops: explicit per-sample gradients.

Every function here forms each sample's weight gradient in full (B × p × d, or B × V × d for an
embedding table) and then reduces it. That is slow and memory-hungry on purpose: it is the
definition, with nothing clever to get wrong. Tests call these on float64 copies of the inputs.
Accumulation is in float32 for low-precision inputs and float64 for float64 inputs.
"""
from __future__ import annotations

import torch


def _acc(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def persample_linear_grad_ref(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G_i = g_iᵀ a_i for a Linear layer y = a Wᵀ. a: (B, T, d), g: (B, T, p) -> (B, p, d)."""
    acc = _acc(a, g)
    return torch.einsum("btp,btd->bpd", g.to(acc), a.to(acc))


def linear_norm_sq_ref(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖g_iᵀ a_i‖²_F per sample. a: (B, T, d), g: (B, T, p) -> (B,)."""
    return persample_linear_grad_ref(a, g).square().sum(dim=(1, 2))


def bias_norm_sq_ref(g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_it‖² per sample (the bias gradient's squared norm). g: (B, T, p) -> (B,)."""
    return g.to(_acc(g)).sum(dim=1).square().sum(dim=1)


def bookkeeping_wgrad_ref(a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Σ_i scale_i g_iᵀ a_i. a: (B, T, d), g: (B, T, p), scale: (B,) -> (p, d)."""
    acc = _acc(a, g, scale)
    return torch.einsum("b,bpd->pd", scale.to(acc), persample_linear_grad_ref(a, g).to(acc))


def bookkeeping_bias_ref(g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Σ_i scale_i Σ_t g_it. g: (B, T, p), scale: (B,) -> (p,)."""
    acc = _acc(g, scale)
    return torch.einsum("b,btp->p", scale.to(acc), g.to(acc))


def persample_embedding_grad_ref(ids: torch.Tensor, g: torch.Tensor, num_embeddings: int,
                                 padding_idx: int | None = None) -> torch.Tensor:
    """E_i[v] = Σ_{t: ids_it = v} g_it, with row padding_idx left at zero.

    ids: (B, T) int64, g: (B, T, d) -> (B, V, d).
    """
    bsz, seq, dim = g.shape
    out = torch.zeros(bsz, num_embeddings, dim, dtype=_acc(g), device=g.device)
    for i in range(bsz):
        out[i].index_add_(0, ids[i], g[i].to(out.dtype))
    if padding_idx is not None:
        out[:, padding_idx] = 0
    return out


def embedding_norm_sq_ref(ids: torch.Tensor, g: torch.Tensor,
                          padding_idx: int | None = None) -> torch.Tensor:
    """‖E_i‖²_F per sample (see persample_embedding_grad_ref). -> (B,)."""
    num = int(ids.max()) + 1 if ids.numel() else 1
    if padding_idx is not None:
        num = max(num, padding_idx + 1)
    return persample_embedding_grad_ref(ids, g, num, padding_idx).square().sum(dim=(1, 2))


def tied_cross_term_ref(ids: torch.Tensor, g_emb: torch.Tensor, a_head: torch.Tensor,
                        g_head: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """⟨E_i, H_i⟩_F with E_i the embedding's per-sample grad and H_i = g_head_iᵀ a_head_i the lm_head's.

    ids: (B, T), g_emb: (B, T, d), a_head: (B, S, d), g_head: (B, S, V) -> (B,).
    """
    vocab = g_head.shape[-1]
    e = persample_embedding_grad_ref(ids, g_emb, vocab, padding_idx)
    h = persample_linear_grad_ref(a_head, g_head)
    return (e * h.to(e.dtype)).sum(dim=(1, 2))
