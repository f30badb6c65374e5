"""Per-layer-type rules: which modules the engine can make private, and how.

A rule runs the module's forward through a dpkern autograd Function whose backward computes
grad_input as usual and leaves on the tape what the per-sample norm and the deferred (book-kept)
weight gradient need (see uses.py); autograd never computes the weight gradient. No module hooks:
the wrapped module's ``forward`` is replaced on the instance (``unwrap_model`` restores it).

Supported: nn.Linear, nn.Embedding, nn.LayerNorm, torch.nn.RMSNorm, the Llama / Qwen2 / Qwen3 /
Mistral RMSNorm modules, Hugging Face Conv1D (GPT-2). Modules with only frozen parameters run
untouched; any other module with a trainable parameter is refused, as is BatchNorm anywhere.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from dpkern.layers.embedding import check_embedding, embedding_forward
from dpkern.layers.linear import conv1d_forward, linear_forward
from dpkern.layers.norm import (HF_RMSNORM_NAMES, hf_rms_norm_forward, layer_norm_forward,
                                rms_norm_forward)
from dpkern.layers._site import Site
from dpkern.ops._persample import FLOAT_DTYPES

__all__ = ["UnsupportedModuleError", "find_rule", "unwrap_model", "wrap_model", "wrap_root"]


class UnsupportedModuleError(ValueError):
    """The model has a module the engine cannot make private (named with its path)."""


def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def find_rule(m: nn.Module):
    """(parameter names, forward factory, use kind) for a supported module, else None."""
    t = type(m)
    if t is nn.Linear or t.__name__ == "NonDynamicallyQuantizableLinear":
        return ("weight", "bias"), linear_forward, "linear"
    if _is_hf_conv1d(m):
        return ("weight", "bias"), conv1d_forward, "linear"
    if t is nn.Embedding:
        return ("weight",), embedding_forward, "embedding"
    if t is nn.LayerNorm:
        return ("weight", "bias"), layer_norm_forward, "persample"
    if hasattr(nn, "RMSNorm") and t is nn.RMSNorm:
        return ("weight",), rms_norm_forward, "persample"
    if t.__name__ in HF_RMSNORM_NAMES and hasattr(m, "variance_epsilon"):
        return ("weight",), hf_rms_norm_forward, "persample"
    return None


def _refuse_mixing(model: nn.Module) -> None:
    for path, m in model.named_modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)):
            raise UnsupportedModuleError(
                f"{path or '<root>'} ({type(m).__name__}): BatchNorm mixes the samples of a batch "
                "(its output for one sample depends on the others), so per-sample clipping cannot "
                "bound one sample's influence; replace it with GroupNorm or LayerNorm")


def wrap_model(model: nn.Module, tape) -> dict:
    """Check the model and route every module with trainable parameters through its rule.

    Returns {parameter: name} for the private (trainable) parameters, in model order. Raises
    UnsupportedModuleError, naming the module's path, for anything the engine cannot make private.
    """
    _refuse_mixing(model)
    for m in model.modules():  # a deep copy of a private model: drop the inert leftovers
        if "_dpkern_site" in m.__dict__ and m._dpkern_site is None:
            _unwrap_one(m)
        root = m.__dict__.get("_dpkern_root")
        if root is not None and root.tape is None:
            _unwrap_one(m)
    plan, kinds = [], {}
    for path, m in model.named_modules():
        trainable = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        if not trainable:
            continue
        where = f"{path or '<root>'} ({type(m).__name__})"
        if getattr(m, "_dpkern_site", None) is not None:
            raise ValueError(f"{where} is already wrapped by a PrivacyEngine; make_private once")
        rule = find_rule(m)
        if rule is None:
            raise UnsupportedModuleError(
                f"{where} has trainable parameters {trainable} and the DP engine has no rule for "
                f"this module type. Freeze it (requires_grad_(False)) or use supported layers "
                "(Linear, Embedding, LayerNorm, RMSNorm, HF Conv1D).")
        names, factory, kind = rule
        extra = set(trainable) - set(names)
        if extra:
            raise UnsupportedModuleError(f"{where}: trainable parameters {sorted(extra)} have no rule")
        if kind == "embedding":
            check_embedding(m, path)
        # the weight only: a bias takes any float dtype (per-sample rows)
        if kind != "persample" and "weight" in trainable and m.weight.dtype not in FLOAT_DTYPES:
            raise UnsupportedModuleError(
                f"{where}: trainable weight of dtype {m.weight.dtype}; the per-sample kernels of "
                "Linear, Conv1D and Embedding weights take float32, bfloat16 and float16. Cast the "
                "model (model.float()) before make_private, or freeze the weight")
        for n in trainable:
            kinds.setdefault(getattr(m, n), []).append((kind, f"{path}.{n}"))
        plan.append((path, m, names, factory))
    _refuse_devices(kinds)
    for p, ks in kinds.items():
        if len({k for k, _ in ks}) > 1 and any(k == "persample" for k, _ in ks):
            raise UnsupportedModuleError(
                "a parameter is shared by layers of kinds the engine cannot combine: "
                + ", ".join(f"{w} ({k})" for k, w in ks))
    for path, m, names, factory in plan:
        _install(m, Site(path, m, tape, names), factory)
    wrap_root(model, tape)
    private = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p not in private:
            private[p] = name
    return private


def _refuse_devices(kinds: dict) -> None:
    """One device for every trainable parameter: the clip factors combine all parameters' norms
    (flat clipping: one norm per sample), so a model split over devices (e.g. a Hugging Face
    device_map) would fail at its first backward with an error that names no layer. Several GPUs
    run one model replica each through torch.distributed (DDP / FSDP)."""
    by_device: dict = {}
    for p, ks in kinds.items():
        by_device.setdefault(str(p.device), []).append(ks[0][1])
    if len(by_device) > 1:
        where = "; ".join(f"{dev}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more"
                                                              if len(names) > 3 else "")
                          for dev, names in by_device.items())
        raise UnsupportedModuleError(
            f"the trainable parameters sit on {len(by_device)} devices ({where}). The DP engine "
            "needs the whole trainable model on one device: move it there (model.to(device)), or "
            "train on several GPUs with one replica each through torch.distributed (DDP / FSDP)")


def _install(m: nn.Module, site: Site, rule_forward) -> None:
    m._dpkern_site = site
    m._dpkern_rule = rule_forward
    m.forward = types.MethodType(_dp_forward, m)


def _dp_forward(self, *args, **kwargs):
    site = self.__dict__.get("_dpkern_site")
    if site is None or not torch.is_grad_enabled():  # inference, or a deep copy: plain module
        return type(self).forward(self, *args, **kwargs)
    tape = site.tape
    if tape.batch_hint is None and args and isinstance(args[0], torch.Tensor) and args[0].dim():
        tape.batch_hint = args[0].shape[0]  # the first wrapped layer of a forward sees B
    return self._dpkern_rule(self, site, *args, **kwargs)


def wrap_root(model: nn.Module, tape) -> None:
    """Each forward of the whole model starts a new batch: forget the previous batch size."""
    model._dpkern_root = _RootTape(tape)
    model._dpkern_root_forward = model.forward  # the module's own forward (maybe wrapped)
    model.forward = types.MethodType(_root_forward, model)


def _root_forward(self, *args, **kwargs):
    root = self.__dict__.get("_dpkern_root")
    if root is not None and root.tape is not None:
        root.tape.batch_hint = None
    return self._dpkern_root_forward(*args, **kwargs)


class _RootTape:
    """Holds the tape for the root forward; a deep copy of the model drops it (see Site)."""

    def __init__(self, tape):
        self.tape = tape

    def __deepcopy__(self, memo):
        return _RootTape(None)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Restore the original forward of every wrapped module (the model stops being private)."""
    for m in model.modules():
        _unwrap_one(m)
    return model


def _unwrap_one(m: nn.Module) -> None:
    for key in ("forward", "_dpkern_site", "_dpkern_rule", "_dpkern_root", "_dpkern_root_forward"):
        m.__dict__.pop(key, None)
