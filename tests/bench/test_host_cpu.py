"""bench/host_cpu.py on a tiny run: one table row of numbers per mode. It runs in a subprocess
because the script sets TRITON_INTERPRET and replaces the interpreter's kernel bodies with no-ops
for its whole process."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_host_cpu_prints_every_mode():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "host_cpu.py"), "--layers", "2",
                          "--steps", "2", "--warmup", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, check=True).stdout
    rows = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(nonprivate|full|subspace)((?:\s+\d+\.\d+){5})", line.strip())
        if m:
            rows[m.group(1)] = [float(x) for x in m.group(2).split()]
    assert set(rows) == {"nonprivate", "full", "subspace"}, out
    for mode, (fwd, bwd, clip, step, total) in rows.items():
        assert fwd > 0 and bwd > 0 and step > 0, (mode, out)
        assert abs(total - (fwd + bwd + step)) <= 0.05 * total + 0.05, (mode, out)
        assert (clip > 0) == (mode != "nonprivate") and clip <= bwd, (mode, out)
