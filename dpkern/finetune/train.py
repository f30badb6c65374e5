"""The training loop (private or not) and evaluation.

One logical step: the Poisson sampler picks the batch's rows (each row with probability q, so the
batch may be empty); the rows are sorted by length and cut into physical micro-batches (less
padding; the order of a sum does not change it); each micro-batch runs forward and backward with
the mean of its per-sample losses (the engine scales by the micro-batch size and clips every
sample once); then one ``optimizer.step()`` adds the noise once and the accountant advances.
"""
from __future__ import annotations

import math
import time

import torch

from dpkern.finetune.data import PadCollate
from dpkern.losses import causal_lm_per_sample_loss, sequence_classification_per_sample_loss


def per_sample_loss(model, batch: dict, causal_lm: bool) -> torch.Tensor:
    """(B,) losses, each depending on its own sample only (never HF's batch-coupled loss)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if causal_lm:
        return causal_lm_per_sample_loss(logits, batch["labels"],
                                         attention_mask=batch["attention_mask"])
    return sequence_classification_per_sample_loss(logits, batch["labels"])


def length_sorted_chunks(dataset, indices: list[int], rows: int, collate: PadCollate):
    """Micro-batches of at most ``rows`` rows, similar lengths together; each on its own dict."""
    order = sorted(indices, key=lambda i: len(dataset.ids[i]))
    for s in range(0, len(order), rows):
        yield collate([dataset[i] for i in order[s:s + rows]])


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model, optimizer, dataset, indices: list[int], *, physical_batch_size: int,
               collate: PadCollate, device, causal_lm: bool, private: bool) -> tuple[float, int]:
    """One logical step over the rows ``indices``; returns (mean train loss or nan, tokens).

    Private: every micro-batch backpropagates the sum of its per-sample losses (the engine's
    loss_reduction="sum": a mean would divide by the realized micro-batch size, which differs
    between neighbouring datasets and, once rounded, moves the other samples' gradients; AdamW is
    invariant to the scale); an empty batch tells the DP optimizer, which then releases noise only.
    Non-private: the same rows, loss = Σ ℓ_i / |batch| (plain mini-batch SGD of the same recipe).
    """
    total, tokens = 0.0, 0
    if not indices:
        if private:
            optimizer.signal_empty_batch()
            optimizer.step()
        optimizer.zero_grad()
        return math.nan, 0
    for mb in length_sorted_chunks(dataset, indices, physical_batch_size, collate):
        mb = _to(mb, device)
        losses = per_sample_loss(model, mb, causal_lm)
        (losses.sum() if private else losses.sum() / len(indices)).backward()
        total += float(losses.detach().sum())
        tokens += int(mb["attention_mask"].sum())
    optimizer.step()
    optimizer.zero_grad()
    return total / len(indices), tokens


@torch.no_grad()
def evaluate(model, dataset, *, collate: PadCollate, device, causal_lm: bool,
             batch_rows: int = 256) -> dict:
    """Accuracy and mean loss (classification) or mean loss and perplexity (causal-LM)."""
    was_training = model.training
    model.eval()
    n, loss_sum, correct, tok_loss, tok_count = 0, 0.0, 0, 0.0, 0
    for mb in length_sorted_chunks(dataset, list(range(len(dataset))), batch_rows, collate):
        mb = _to(mb, device)
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        if causal_lm:
            losses = causal_lm_per_sample_loss(logits, mb["labels"],
                                               attention_mask=mb["attention_mask"])
            count = (mb["attention_mask"][:, 1:] != 0).sum(dim=1)
            tok_loss += float((losses * count).sum())
            tok_count += int(count.sum())
        else:
            losses = sequence_classification_per_sample_loss(logits, mb["labels"])
            correct += int((logits.argmax(-1) == mb["labels"]).sum())
        loss_sum += float(losses.sum())
        n += len(losses)
    model.train(was_training)
    out = {"loss": loss_sum / max(n, 1), "rows": n}
    if causal_lm:
        out["perplexity"] = math.exp(min(tok_loss / max(tok_count, 1), 50.0))
    else:
        out["accuracy"] = correct / max(n, 1)
    return out


class Throughput:
    """Rows and tokens per second over the steps since the start (or resume)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.rows = 0
        self.tokens = 0

    def add(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens

    def rates(self) -> tuple[float, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return self.rows / dt, self.tokens / dt
