"""Data for the fine-tuning job: SST-2, CSV/TSV/JSONL with text + label columns, plain text for LMs.

Every reader returns plain Python rows and fails with a FinetuneError that names the file and what
is wrong (missing, empty, missing column, label out of range) before any model is touched. One row
is one privacy unit: for classification one (text, label) pair, for causal-LM one line of text.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from dpkern.finetune.config import FinetuneError, default_data_dir

SST2_FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "glue_dev.tsv"}
TEXT_COLUMNS = ("sentence", "text")
HOLDOUT_FRACTION = 0.1  # a single data file: this share is held out for selection and the report


@dataclass
class Splits:
    """Rows of each split: ``[(text, label)]`` (label None for causal-LM)."""

    train: list
    dev: list
    test: list
    source: str
    test_name: str


def _read_table(path: Path, text_column: str | None, label_column: str | None) -> list:
    """Rows of a .csv / .tsv / .jsonl file as ``[(text, label or None)]``."""
    suffix = path.suffix.lower()
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if suffix in (".jsonl", ".json"):
                records = []
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise FinetuneError(f"--data: {path} line {lineno} is not JSON ({e})")
                columns = set(records[0]) if records else set()
            elif suffix in (".csv", ".tsv"):
                kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
                reader = csv.DictReader(f, **kw)
                columns = set(reader.fieldnames or ())
                records = list(reader)
            else:
                raise FinetuneError(f"--data: {path} must end in .csv, .tsv, .jsonl "
                                    "(or .txt with --task causal-lm)")
    except UnicodeDecodeError as e:
        raise FinetuneError(f"--data: {path} is not UTF-8 text ({e})") from None
    if not records:
        raise FinetuneError(f"--data: {path} has no data rows")
    text_col = text_column if text_column in columns else None
    if text_col is None and text_column in TEXT_COLUMNS:  # the default: accept either name
        text_col = next((c for c in TEXT_COLUMNS if c in columns), None)
    if text_col is None:
        raise FinetuneError(f"--data: {path} has no text column {text_column!r} (columns: "
                            f"{', '.join(sorted(map(str, columns)))}); pick one with --text-column")
    if label_column is not None and label_column not in columns:
        raise FinetuneError(f"--data: {path} has no label column {label_column!r} (columns: "
                            f"{', '.join(sorted(map(str, columns)))}); pick one with "
                            "--label-column")
    rows = []
    for i, rec in enumerate(records):
        text = rec.get(text_col)
        if text is None:
            raise FinetuneError(f"--data: {path} row {i + 1} has no {text_col!r} value")
        label = None
        if label_column is not None:
            raw = rec.get(label_column)
            try:
                label = int(str(raw).strip())
                if str(raw).strip() != str(label) and float(raw) != label:
                    raise ValueError
            except (TypeError, ValueError):
                raise FinetuneError(f"--data: {path} row {i + 1}: label {raw!r} is not an integer "
                                    "class id (labels must be 0 .. num_labels-1)") from None
        rows.append((str(text), label))
    return rows


def _read_text(path: Path) -> list:
    """Non-empty lines of a text file, one training sequence (privacy unit) each."""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise FinetuneError(f"--data: {path} is not UTF-8 text ({e})") from None
    rows = [(ln, None) for ln in lines if ln]
    if not rows:
        raise FinetuneError(f"--data: {path} has no non-empty lines")
    return rows


def _holdout(rows: list, seed: int | None) -> tuple[list, list]:
    """Deterministic split of one file into (train, held-out); needs at least 2 rows."""
    if len(rows) < 2:
        raise FinetuneError(f"--data: need at least 2 rows to hold some out, got {len(rows)}")
    order = list(range(len(rows)))
    random.Random(0 if seed is None else seed).shuffle(order)
    n_hold = max(1, round(HOLDOUT_FRACTION * len(rows)))
    held = sorted(order[:n_hold])
    keep = sorted(order[n_hold:])
    return [rows[i] for i in keep], [rows[i] for i in held]


def load_splits(data: str, *, task: str = "classification", text_column: str = "sentence",
                label_column: str = "label", seed: int | None = 0) -> Splits:
    """Reads ``data``: ``sst2``, a folder with train/dev/glue_dev .tsv files, or one file.

    A single file is split 90/10; the held-out tenth is used both for selection and for the report
    (say so: it is not an independent test set).
    """
    label_col = label_column if task == "classification" else None
    if data == "sst2":
        path = default_data_dir()
        if not path.is_dir():
            raise FinetuneError(f"--data: SST-2 was not found at {path} (expected beside the "
                                "checkout, ../shared/data/sst2, or set DPKERN_SST2); pass --data PATH "
                                "to a folder with train.tsv, dev.tsv and glue_dev.tsv, or to a "
                                "data file")
    else:
        path = Path(data).expanduser()
    if not path.exists():
        raise FinetuneError(f"--data: {path} does not exist")
    if path.is_dir():
        missing = [n for n in SST2_FILES.values() if not (path / n).is_file()]
        if missing:
            raise FinetuneError(f"--data: folder {path} lacks {', '.join(missing)} (a data folder "
                                "holds train.tsv, dev.tsv and glue_dev.tsv)")
        if task != "classification":
            raise FinetuneError("--task causal-lm needs a .txt file for --data")
        read = {k: _read_table(path / n, text_column, label_col) for k, n in SST2_FILES.items()}
        return Splits(read["train"], read["dev"], read["test"], str(path), SST2_FILES["test"])
    if task == "causal-lm":
        rows = _read_text(path) if path.suffix.lower() == ".txt" else [
            (t, None) for t, _ in _read_table(path, text_column, None)]
    else:
        if path.suffix.lower() == ".txt":
            raise FinetuneError(f"--data: {path} is plain text; classification needs a .csv, .tsv "
                                "or .jsonl file with text and label columns (or use --task "
                                "causal-lm)")
        rows = _read_table(path, text_column, label_col)
    train, held = _holdout(rows, seed)
    return Splits(train, held, held, str(path), f"held-out {len(held)} rows of {path.name}")


def check_labels(splits: Splits, num_labels: int | None) -> int:
    """Number of classes (given or max label + 1); raises on labels outside [0, num_labels)."""
    labels = [y for part in (splits.train, splits.dev, splits.test) for _, y in part]
    n = num_labels if num_labels is not None else max(labels) + 1
    bad = sorted({y for y in labels if not 0 <= y < n})
    if bad:
        raise FinetuneError(f"--data: labels {bad[:5]} are out of range: labels must be 0 .. "
                            f"{n - 1} (num_labels={n}{'' if num_labels else ', from the data'})")
    if n < 2:
        raise FinetuneError(f"--data: only one class (label 0) in {splits.source}; "
                            "classification needs at least 2 (or pass --num-labels)")
    return n


class TokenizedDataset(torch.utils.data.Dataset):
    """Token ids (truncated to max_length, unpadded) with their label; padding happens per batch.

    Item: ``{"input_ids": LongTensor[T_i], "labels": LongTensor[] or LongTensor[T_i]}``.
    """

    def __init__(self, rows: list, tokenizer, max_length: int, causal_lm: bool = False):
        enc = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)
        self.ids = [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]
        self.labels = [y for _, y in rows]
        self.causal_lm = causal_lm

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        label = ids.clone() if self.causal_lm else torch.tensor(self.labels[i], dtype=torch.long)
        return {"input_ids": ids, "labels": label}


class PadCollate:
    """Pads a list of items to the longest in the batch: input_ids [B, T], attention_mask [B, T],
    labels [B] (classification) or [B, T] with -100 on padding (causal-LM)."""

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, items: list) -> dict:
        t = max([len(it["input_ids"]) for it in items] + [1])
        b = len(items)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        seq_labels = b > 0 and items[0]["labels"].dim() == 1
        labels = torch.full((b, t), -100, dtype=torch.long) if seq_labels else torch.zeros(
            b, dtype=torch.long)
        for k, it in enumerate(items):
            n = len(it["input_ids"])
            ids[k, :n] = it["input_ids"]
            mask[k, :n] = 1
            if seq_labels:
                labels[k, :n] = it["labels"]
            else:
                labels[k] = it["labels"]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
