"""Integrations with training frameworks (import transformers lazily: dpkern works without it).

``DPTrainer`` / ``make_trainer_private`` / ``PrivacyArguments``: Hugging Face Trainer + DP-SGD.
"""
from __future__ import annotations

__all__ = ["DPTrainer", "DPTrainerMixin", "PrivacyArguments", "make_trainer_private"]


def __getattr__(name):
    if name in __all__:
        from dpkern.integrations import hf_trainer
        return getattr(hf_trainer, name)
    raise AttributeError(f"module 'dpkern.integrations' has no attribute {name!r}")
