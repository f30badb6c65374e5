"""Count the kernel launches of a piece of code, on the CPU (interpreter) or a GPU: Triton launches
(exact) and the aten ops that would launch a kernel on a GPU (views, allocations and metadata ops
excluded). Used by tests/subspace/test_grouped_launches.py to pin the launches of the projected
backward and step, and by bench/subspace_probe.py (--parts launches).

    with count_launches() as c:
        ...
    c.total, c.triton, c.aten, c.by_name   # counts; by_name: Counter {name: launches}
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that move no data on a GPU (views, allocation, metadata): not launches
_NO_LAUNCH = {
    "view", "_unsafe_view", "as_strided", "unbind", "select", "slice", "t", "transpose", "permute",
    "expand", "squeeze", "unsqueeze", "alias", "detach", "empty", "empty_strided", "empty_like",
    "split", "split_with_sizes", "chunk", "narrow", "reshape", "unflatten", "flatten", "diagonal",
    "_reshape_alias", "lift_fresh", "set_", "resize_", "is_same_size", "_has_compatible_shallow_copy_type",
    "view_as", "numpy_T", "real", "conj", "_conj", "_neg_view", "resolve_conj", "resolve_neg",
    "is_nonzero", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size",
    "stride", "_local_scalar_dense", "record_stream", "pin_memory", "_pin_memory", "is_pinned",
}


class _Counter(TorchDispatchMode):
    def __init__(self, counts: Counter, inside: list):
        super().__init__()
        self.counts = counts
        self.inside = inside  # [depth] of Triton launches: the interpreter's own torch ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_LAUNCH and not self.inside[0]:
            # a copy between devices or into itself is still a launch; a no-op .to() never gets here
            self.counts["aten:" + name] += 1
        return func(*args, **(kwargs or {}))


class Launches:
    def __init__(self):
        self.by_name: Counter = Counter()

    @property
    def triton(self) -> int:
        return sum(n for k, n in self.by_name.items() if k.startswith("triton:"))

    @property
    def aten(self) -> int:
        return sum(n for k, n in self.by_name.items() if k.startswith("aten:"))

    @property
    def total(self) -> int:
        return self.triton + self.aten

    def __repr__(self):
        return f"Launches(total={self.total}, triton={self.triton}, aten={self.aten})"


@contextlib.contextmanager
def count_launches():
    """Count launches inside the block (Triton: JITFunction.run, or the interpreter's run)."""
    import triton.runtime.jit as jit
    res = Launches()
    inside = [0]
    patched = []
    targets = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        targets.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    for cls in targets:
        orig = cls.run

        def run(self, *args, _orig=orig, **kwargs):
            if not kwargs.get("warmup", False) and not inside[0]:
                res.by_name["triton:" + getattr(self, "__name__", "?")] += 1
            inside[0] += 1
            try:
                return _orig(self, *args, **kwargs)
            finally:
                inside[0] -= 1
        cls.run = run
        patched.append((cls, orig))
    try:
        with _Counter(res.by_name, inside):
            yield res
    finally:
        for cls, orig in patched:
            cls.run = orig


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
