"""Per-sample squared norm of an embedding table's gradient, and the tied embedding / lm_head term.

Sample i's embedding gradient E_i (V × d) has row v = Σ_{t: ids_it = v} g_it, with row padding_idx
zero. Then ‖E_i‖²_F = Σ_{t,s} [ids_it = ids_is ≠ pad] ⟨g_it, g_is⟩: a masked Gram, no V × d tensor.

With a tied lm_head (weight shared with the embedding), the shared parameter's per-sample gradient is
E_i + H_i where H_i = g_head_iᵀ a_head_i, and ‖E_i + H_i‖² = ‖E_i‖² + ‖H_i‖² + 2⟨E_i, H_i⟩. The cross
term ⟨E_i, H_i⟩ = Σ_t Σ_s g_head_i[s, ids_it] ⟨a_head_is, g_emb_it⟩ (pad tokens t excluded): a T × S
plane of gathered logit gradients times a Gram of activations — again no V × d tensor.
"""
from __future__ import annotations

import torch

from dpkern import _alloc
from dpkern.backend import resolve_backend
from dpkern.ops._persample import (check_device, check_same, check_tensor, exact_fp32_matmul,
                                   fp32_mode, operand, sample_chunks)

_IMPLEMENTED = ("triton", "torch")
_ID_DTYPES = (torch.int64, torch.int32)
_fp32_mode = fp32_mode  # the parameter of the same name shadows it inside the ops


def _check_ids(op, ids, g, gname):
    check_tensor(op, "ids", ids, 2, dtypes=_ID_DTYPES)
    check_tensor(op, gname, g, 3)
    check_same(op, "batch and sequence sizes", {"ids.shape": tuple(ids.shape),
                                                f"{gname}.shape[:2]": tuple(g.shape[:2])})
    check_device(op, {"ids": ids, gname: g})


def _check_padding(op, padding_idx):
    if padding_idx is not None and (not isinstance(padding_idx, int) or padding_idx < 0):
        raise ValueError(f"{op}: padding_idx must be None or a non-negative int (normalise "
                         f"negative indices first), got {padding_idx!r}")


def _torch_embedding_norm(ids, g, padding_idx):
    """By unique tokens: segment-sum g over equal (sample, token) keys, square, sum per sample."""
    bsz, seq, d = g.shape
    ids = ids.long()
    keep = torch.ones_like(ids, dtype=torch.bool) if padding_idx is None else ids != padding_idx
    width = int(ids.max()) + 1
    keys = (ids + width * torch.arange(bsz, device=ids.device)[:, None])[keep]
    uniq, inv = torch.unique(keys, return_inverse=True)
    rows = torch.zeros(uniq.numel(), d, dtype=torch.float32, device=g.device)
    rows.index_add_(0, inv, g[keep].float())
    out = torch.zeros(bsz, dtype=torch.float32, device=g.device)
    return out.index_add_(0, uniq // width, rows.square().sum(dim=1))


def embedding_norm_sq(ids: torch.Tensor, g: torch.Tensor, *, padding_idx: int | None = None,
                      backend: str | None = None) -> torch.Tensor:
    """Per-sample ‖E_i‖²_F of an nn.Embedding's weight gradient, in fp32.

    Args:
        ids: (B, T) int64 / int32 token ids, all in [0, V).
        g: (B, T, d) gradient of the embedding output; float32 / float16 / bfloat16.
        padding_idx: row that receives no gradient (as nn.Embedding(padding_idx=...)), or None.
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").
    Returns:
        (B,) float32.

    Example:
        >>> ids = torch.tensor([[3, 3, 0]]); g = torch.ones(1, 3, 2)
        >>> embedding_norm_sq(ids, g)          # rows: 3 -> (2, 2), 0 -> (1, 1)
        tensor([10.])
        >>> embedding_norm_sq(ids, g, padding_idx=0)
        tensor([8.])
    """
    op = "embedding_norm_sq"
    _check_ids(op, ids, g, "g")
    _check_padding(op, padding_idx)
    be = resolve_backend(backend, g.device, op=op, implemented=_IMPLEMENTED, auto_order=("triton",))
    bsz, seq, _ = g.shape
    if bsz * seq == 0:
        return torch.zeros(bsz, dtype=torch.float32, device=g.device)
    if be == "torch":
        return _torch_embedding_norm(ids, g, padding_idx)
    from dpkern.kernels.embedding_norm import embedding_norm_fwd
    out = _alloc.empty(bsz, dtype=torch.float32, device=g.device)
    embedding_norm_fwd(ids, g, out, padding_idx=padding_idx, empty=_alloc.empty)
    return out


def _torch_tied_cross(ids, g_emb, a_head, g_head, padding_idx, mode):
    bsz, seq, d = g_emb.shape
    s_len = a_head.shape[1]
    out = torch.empty(bsz, dtype=torch.float32, device=g_emb.device)
    with exact_fp32_matmul(g_emb.device):
        for sl in sample_chunks(bsz, 12 * seq * s_len + 4 * (seq + s_len) * d):
            idx = ids[sl].long()
            # gathered[i, s, t] = g_head[i, s, ids[i, t]]
            # the lm_head operands as its book-keeping rounds them ("tf32r"); g_emb is never rounded
            gathered = operand(g_head[sl].gather(2, idx[:, None, :].expand(-1, s_len, -1)), mode)
            if padding_idx is not None:
                gathered = gathered * (idx != padding_idx)[:, None, :]
            gram = operand(a_head[sl], mode) @ g_emb[sl].float().transpose(1, 2)  # (b, S, T)
            out[sl] = (gathered * gram).sum(dim=(1, 2), dtype=torch.float64)
    return out


def tied_cross_term(ids: torch.Tensor, g_emb: torch.Tensor, a_head: torch.Tensor,
                    g_head: torch.Tensor, *, padding_idx: int | None = None,
                    backend: str | None = None, fp32_mode: str | None = None) -> torch.Tensor:
    """Per-sample ⟨E_i, H_i⟩_F for an embedding tied to an lm_head, in fp32, never forming V × d.

    Args:
        ids: (B, T) int64 / int32 embedding input ids.
        g_emb: (B, T, d) gradient of the embedding output.
        a_head: (B, S, d) lm_head input.
        g_head: (B, S, V) gradient of the logits.
        padding_idx: the embedding's padding row (no embedding gradient), or None.
        backend: "auto" | "triton" | "torch" (default: DPKERN_BACKEND or "auto").
        fp32_mode: the mode of the lm_head's norm and book-keeping ("tf32r": a_head and g_head are
            rounded to TF32 as they are; g_emb never is, its book-keeping is an fp32 index_add).
    Returns:
        (B,) float32; the tied weight's norm² is ‖E‖² + ‖H‖² + 2 · this.
    """
    op = "tied_cross_term"
    _check_ids(op, ids, g_emb, "g_emb")
    check_tensor(op, "a_head", a_head, 3)
    check_tensor(op, "g_head", g_head, 3)
    check_same(op, "a_head and g_head batch and sequence sizes",
               {"a_head.shape[:2]": tuple(a_head.shape[:2]),
                "g_head.shape[:2]": tuple(g_head.shape[:2])})
    check_same(op, "batch sizes", {"ids.shape[0]": ids.shape[0], "a_head.shape[0]": a_head.shape[0]})
    check_same(op, "hidden sizes", {"g_emb.shape[2]": g_emb.shape[2],
                                    "a_head.shape[2]": a_head.shape[2]})
    check_device(op, {"ids": ids, "a_head": a_head, "g_head": g_head})
    _check_padding(op, padding_idx)
    mode = _fp32_mode(g_emb.device, fp32_mode)
    be = resolve_backend(backend, g_emb.device, op=op, implemented=_IMPLEMENTED,
                         auto_order=("triton",))
    bsz, seq, _ = g_emb.shape
    if bsz * seq * a_head.shape[1] == 0:
        return torch.zeros(bsz, dtype=torch.float32, device=g_emb.device)
    if be == "torch":
        return _torch_tied_cross(ids, g_emb, a_head, g_head, padding_idx, mode)
    from dpkern.kernels.embedding_norm import tied_cross_fwd
    out = _alloc.empty(bsz, dtype=torch.float32, device=g_emb.device)
    tied_cross_fwd(ids, g_emb, a_head, g_head, out, padding_idx=padding_idx,
                   empty=_alloc.empty, fp32_mode=mode)
    return out
