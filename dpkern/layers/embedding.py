"""nn.Embedding (padding_idx honoured): the tape keeps (ids, grad_out); no dense V × d gradient is
formed by autograd. max_norm, scale_grad_by_freq and sparse are refused when wrapping."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dpkern.layers._site import Site, function_apply
from dpkern.layers.uses import EmbeddingUse


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, site):
        ctx.site = site
        ctx.padding_idx = padding_idx
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, gy):
        (ids,) = ctx.saved_tensors
        site = ctx.site
        if ids.dim() == 0:
            raise RuntimeError(f"{site.path}: input ids need a batch dimension first")
        bsz = ids.shape[0]
        site.record("weight", EmbeddingUse(ids.reshape(bsz, -1), gy.reshape(bsz, -1, gy.shape[-1]),
                                           ctx.padding_idx, site.path))
        return None, None, None, None


_embedding_apply = function_apply(_EmbeddingFn)


def check_embedding(module: torch.nn.Embedding, path: str) -> None:
    bad = [k for k in ("max_norm", "scale_grad_by_freq", "sparse") if getattr(module, k)]
    if bad:
        raise ValueError(f"{path} ({type(module).__name__}): {', '.join(bad)} is not supported by "
                         "the DP engine (it makes one sample's update depend on others or rewrites "
                         "the weight in the forward pass)")


def embedding_forward(module: torch.nn.Embedding, site: Site, ids: torch.Tensor) -> torch.Tensor:
    hint = site.tape.batch_hint
    if ids.dim() >= 1 and ids.shape[0] == 1 and hint is not None and hint > 1:
        # Ids shared by the whole batch (GPT-2 / BERT position_ids of shape (1, T)): the output
        # would be broadcast over the batch and autograd would sum its gradient over samples
        # before we see it. Expanding gives the same values and keeps per-sample gradients.
        ids = ids.expand(hint, *ids.shape[1:])
    return _embedding_apply(ids, module.weight, module.padding_idx, site)
