"""The README's main job on a GPU (backend auto): MiniLM on SST-2 at ε=3, timed.

Runs only with a CUDA device and the SST-2 data beside the checkout (../shared/data/sst2); prints
the wall time, accuracy and ε, and writes them to $OUT/finetune_gpu.json when $OUT is set.
"""
from __future__ import annotations

import json
import os
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
        pytest.skip(f"SST-2 not found at {default_data_dir()}")
    results = {}
    for private in (True, False):
        t0 = time.perf_counter()
        s = run(FinetuneConfig(device="cuda", backend="auto", private=private, progress=False,
                               output_dir=str(tmp_path / ("dp" if private else "plain"))))
        results["private" if private else "nonprivate"] = {
            "wall_s": time.perf_counter() - t0, "train_s": s["train_seconds"],
            "glue_dev_accuracy": s["test_accuracy"], "epsilon": s["epsilon"],
            "device": torch.cuda.get_device_name()}
    print(json.dumps(results, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "finetune_gpu.json").write_text(json.dumps(results, indent=1))
    assert 2.9 < results["private"]["epsilon"] <= 3.0
    assert results["private"]["glue_dev_accuracy"] > 0.6
    assert results["nonprivate"]["glue_dev_accuracy"] > 0.7
