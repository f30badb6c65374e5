#!/usr/bin/env bash
# Tune the default `dpkern finetune` recipe on the GPU (selection on dev.tsv only): ε = 3, δ = 1e-5,
# each line one private run; prints best dev accuracy, glue_dev accuracy and wall time per setting.
# Usage: OUT=... bash bench/finetune_sweep.sh "lr,batch,steps,trainable" ...
set -uo pipefail
PY=${PYTHON:-python3}
for spec in "$@"; do
  IFS=, read -r lr bs steps tr <<< "$spec"
  dir="$OUT/sweep/lr${lr}_b${bs}_s${steps}_${tr}"
  t0=$(date +%s.%N)
  $PY -m dpkern finetune --device cuda --lr "$lr" --batch-size "$bs" --steps "$steps" \
      --trainable "$tr" --output-dir "$dir" --no-progress > "$dir.log" 2>&1 || { echo "$spec failed"; tail -3 "$dir.log"; continue; }
  $PY - "$dir" "$spec" "$t0" <<'PYEOF'
import json, sys, time
s = json.load(open(sys.argv[1] + "/summary.json"))
dev = [v for k, v in s.items() if k.startswith("best_dev_")]
test = [v for k, v in s.items() if k.startswith("test_") and k != "test_loss" and k != "test_split"]
print(f"{sys.argv[2]:32s} dev {dev[0]:.4f}  glue_dev {test[0]:.4f}  eps {s['epsilon']:.3f}  wall {time.time() - float(sys.argv[3]):.0f} s")
PYEOF
done
