"""bench/sm90_regs.py: the book-keeping kernel compiled for sm_90 on this host (in a child process
without the interpreter), ptxas's report parsed, and the register pressure the results README
explains (two fp32 accumulators of a 128 x 256 tile on 8 warps spill; 128 x 128 do not)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import sm90_regs

ROOT = Path(__file__).resolve().parents[2]


def test_parse_ptxas_reads_registers_and_spills():
    log = ("ptxas info    : Function properties for k\n"
           "    528 bytes stack frame, 680 bytes spill stores, 664 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 528 bytes cumulative stack size\n")
    assert sm90_regs.parse_ptxas(log) == {"regs": 255, "spill_stores": 680, "spill_loads": 664}
    with pytest.raises(ValueError, match="no register report"):
        sm90_regs.parse_ptxas("ptxas fatal")


def test_refuses_to_run_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit):
        sm90_regs.main(["--dtypes", "bf16", "--configs", "0"])


def test_tma_tiles_spill_at_128x256_not_at_128x128(tmp_path):
    out = tmp_path / "regs.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    assert sm90_regs.CONFIGS[0] == (128, 256, 64, 8, 3, True)  # the heuristic's 16-bit form
    assert sm90_regs.CONFIGS[2] == (128, 128, 64, 8, 3, True)
    subprocess.run([sys.executable, str(ROOT / "bench" / "sm90_regs.py"), "--dtypes", "bf16",
                    "--configs", "0,2", "--json", str(out)], env=env, check=True, timeout=600)
    wide, square = json.loads(out.read_text())
    assert wide["config"] == "128x256x64 w8 s3 tma" and wide["spill_stores"] > 0
    assert wide["regs"] == 255 and square["spill_stores"] == 0 and 0 < square["regs"] < 255
    assert wide["shared"] > square["shared"] > 0 and not wide["warp_specialized"]
