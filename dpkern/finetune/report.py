"""The run folder: metrics as JSON lines, the privacy report, checkpoints, and the PNG of curves.

Layout of ``<output_dir>``::

    config.json       the settings of the run (resume reads them back)
    metrics.jsonl     one JSON object per line: {"kind": "train"|"eval"|"test", "step": ..., ...}
    checkpoint.pt     the latest checkpoint (written to a temporary file, then renamed: a crash
                      never leaves a half-written one)
    model/            the selected model (best dev accuracy) and its tokenizer
    privacy.json      the privacy report: ε, δ, σ, q, steps, C, accountant, what one unit is
    curves.png        accuracy / loss and ε against the step
    summary.json      the headline numbers
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from dpkern.engine.checkpoint import atomic_write


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


class MetricsLog:
    """Append-only JSON-lines log; every line is flushed and fsynced as it is written."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """On resume: drop the rows logged after the checkpoint's step (they are redone)."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.read() if ln.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        atomic_write(self.path, lambda f: f.write(text.encode()))

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: everything before it stands
                break
        return rows


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def plot_curves(rows: list[dict], path: Path, title: str = "",
                delta: float | None = None) -> Path | None:
    """PNG with two panels: dev/test accuracy and train loss (left), ε spent (right), vs step.
    Returns None (no PNG; metrics.jsonl holds the same numbers) where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:gray",
                 lw=1, label="train loss (batch mean)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax2 = ax1.twinx()
    key = "accuracy" if any("accuracy" in r for r in evals) else "perplexity"
    pts = [(r["step"], r[key]) for r in evals if key in r]
    if pts:
        ax2.plot(*zip(*pts), "o-", color="tab:blue", label=f"dev {key}")
    for r in rows:
        if r.get("kind") == "test" and key in r:
            ax2.plot([r["step"]], [r[key]], "*", ms=12, color="tab:red", label=f"test {key}")
    ax2.set_ylabel(key)
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax1.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    if lines:
        ax1.legend(lines, labels, loc="center right", fontsize=8)
    ax1.set_title("loss and accuracy")
    eps = [(r["step"], r["epsilon"]) for r in train if r.get("epsilon") is not None
           and math.isfinite(r["epsilon"])]
    if eps:
        ax3.plot(*zip(*eps), color="tab:green")
        ax3.set_title("privacy spent: ε" + (f" at δ = {delta:g}" if delta else ""))
    else:
        ax3.set_title("non-private run: no ε")
    ax3.set_xlabel("step")
    ax3.set_ylabel("ε")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
    return path
