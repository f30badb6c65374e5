"""Per-sample losses: one loss term per sequence, the privacy unit.

DP-SGD clips each sample's gradient, so the loss must be a sum (or mean) of per-sample terms
ℓ_i that each depend on sample i only. The Hugging Face built-in ``outputs.loss`` of a causal LM is
the mean over *all unmasked tokens of the batch*: ℓ = Σ_i Σ_t ℓ_it / Σ_j n_j. Its gradient for
sample i is scaled by 1 / Σ_j n_j, which depends on the other samples' lengths n_j: the samples are
coupled. Clipping "per sample" then no longer bounds one record's influence (removing sample j
rescales every other sample's gradient), and a long sequence weighs more than a short one. The
helpers here compute ℓ_i = (1 / n_i) Σ_t ℓ_it, so ``per_sample_losses(...).mean()`` (or ``.sum()``
with loss_reduction="sum") is what ``loss.backward()`` should see.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F


def causal_lm_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, *,
                              attention_mask: torch.Tensor | None = None,
                              ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, padding masked.

    Args:
        logits: (B, T, V) float.
        labels: (B, T) int64, aligned with the inputs (shifted here, as Hugging Face does);
            positions equal to ignore_index do not count.
        attention_mask: optional (B, T); positions with 0 do not count as targets.
    Returns:
        (B,) float32 (float64 for float64 logits); a sequence with no target token gives 0.

    Example:
        >>> causal_lm_per_sample_loss(torch.zeros(2, 4, 10), torch.ones(2, 4, dtype=torch.long))
        tensor([2.3026, 2.3026])
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be (B, T) = {tuple(logits.shape[:2])}, "
                         f"got {tuple(labels.shape)}")
    target = labels[:, 1:].clone()
    if attention_mask is not None:
        target[attention_mask[:, 1:] == 0] = ignore_index
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    tok = F.cross_entropy(logits[:, :-1].to(acc).transpose(1, 2), target,
                          ignore_index=ignore_index, reduction="none")  # (B, T-1)
    count = (target != ignore_index).sum(dim=1)
    return tok.sum(dim=1) / count.clamp(min=1)


def sequence_classification_per_sample_loss(logits: torch.Tensor,
                                            labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample for (B, K) logits and (B,) int labels; squared error per sample for
    a regression head ((B, 1) or (B,) logits, float labels). Returns (B,)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if labels.is_floating_point():
        return (logits.to(acc).reshape(labels.shape) - labels.to(acc)).square()
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits (B, K) and labels (B,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    return F.cross_entropy(logits.to(acc), labels, reduction="none")


def per_sample_losses(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Run a Hugging Face model on `batch` (without labels, so it computes no coupled loss) and
    return the per-sample losses (B,).

    Causal LM (3-D logits): labels = batch["labels"] if given, else input_ids; attention_mask masks
    padding. Sequence classification (2-D logits): labels = batch["labels"].
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    if logits.dim() == 3:
        labels = batch.get("labels", batch.get("input_ids"))
        return causal_lm_per_sample_loss(logits, labels, attention_mask=batch.get("attention_mask"))
    if "labels" not in batch:
        raise ValueError("batch: sequence classification needs batch['labels']")
    return sequence_classification_per_sample_loss(logits, batch["labels"])
