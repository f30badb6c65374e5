"""Helpers for counting the launches of the projected step (the counter is tests/opcount.py):
a small Llama of the 1B model's layer structure, random bases for it, and the launches of the DP
part of a projected step. Used by tests/subspace/test_grouped_launches.py to pin the launches of
the projected backward and step, and by bench/subspace_probe.py (--parts launches).
"""
from __future__ import annotations

import torch

from tests.opcount import count_launches


def tiny_llama(layers: int = 2, hidden: int = 32, mlp: int = 48, vocab: int = 64,
               device: str = "cpu"):
    """A Llama with the 1B model's structure (per decoder layer q, k, v, o of hidden x hidden,
    gate / up of mlp x hidden, down of hidden x mlp; an untied lm_head): the same rank and
    layout groups as the 1B model, with `layers` layers. (model, config)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg), cfg


def llama_bases(model, rank: int, device: str = "cpu") -> dict:
    """Random orthonormal bases of rank `rank` for every decoder Linear and the lm_head."""
    from dpkern.subspace import orthonormalize
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (".layers." in "." + name or name == "lm_head"):
            p, d = m.weight.shape
            out[name] = (orthonormalize(torch.randn(p, rank, generator=g)).to(device),
                         orthonormalize(torch.randn(d, rank, generator=g)).to(device))
    return out


def dp_part_launches(dp, loss_fn, steps: int):
    """(backward, step) Launches of the DP part of the last of `steps` projected training steps:
    the end-of-backward clipper (_SubspaceClipper.__call__) and dp.step(). loss_fn() returns the
    loss of one forward pass."""
    import dpkern.subspace.engine as eng_mod
    counted = {}
    clip = eng_mod._SubspaceClipper.__call__

    def counting(self, uses):
        with count_launches() as c:
            clip(self, uses)
        counted["backward"] = c
    eng_mod._SubspaceClipper.__call__ = counting
    try:
        for _ in range(steps):
            loss_fn().backward()
            with count_launches() as c:
                dp.step()
            counted["step"] = c
            dp.zero_grad()
    finally:
        eng_mod._SubspaceClipper.__call__ = clip
    return counted["backward"], counted["step"]
