#!/usr/bin/env bash
# Distributed DP on a machine with >= 2 GPUs, in one call (< 8 min):
#   1. build the CUDA extension (skipped if already importable; a failure is logged and the
#      Triton backends are used),
#   2. tests/distributed with gloo AND nccl (2 ranks, one GPU each),
#   3. bench/dist_scaling.py: tokens/s on 1 and 2 GPUs for ~1B and ~3B Llama, DP and
#      non-private, and the noise-variance check,
#   4. with FSDP=1 (FSDP_ONLY=1: instead of 3): DP over FSDP2, per-parameter reductions vs
#      reduce_at_step, tokens/s and peak memory (under $OUT/fsdp).
# Every stage has its own time limit; a failing stage is logged and the next one runs.
# Writes under $OUT (default bench/results/dist_h200): env.txt, build.log, tests_dist.log,
# scaling.log, results.json, scaling.csv, summary.txt, stages.txt.
# Usage: OUT=... PY=python3 bash bench/gpu_dist.sh     (SKIP_BUILD=1: use the installed dpkern)
set -uo pipefail
# NVLink multicast stays off, before any process (python, NCCL) starts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/dist_h200}
mkdir -p "$OUT"
PY=${PY:-${PYTHON:-python3}}
# Wheels the GPU machine lacks travel in .whl/ (as bench/gpu_all.sh).
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
T0=$(date +%s)
stage() {  # stage NAME LIMIT_S LOG CMD...: run with a time limit, log rc and time, never abort
  local name=$1 limit=$2 log=$3; shift 3
  local s=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s (limit ${limit}s, log $log)" | tee -a "$OUT/stages.txt"
  tail -4 "$OUT/$log"
  return 0
}
{
  date -u; echo "commit ${DPKERN_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  env | grep -E '^(NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS)='
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} > "$OUT/env.txt" 2>&1
: > "$OUT/stages.txt"
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  echo "build skipped: SKIP_BUILD=1" | tee -a "$OUT/stages.txt"
elif $PY -c "import dpkern, sys; sys.exit(0 if dpkern.cuda_available() else 1)" 2>/dev/null; then
  echo "build skipped: extension already importable" | tee -a "$OUT/stages.txt"
else
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    stage build 110 build.log $PY -m pip install --no-build-isolation --no-deps -e .
fi
$PY -c "import dpkern; print('cuda_available', dpkern.cuda_available(), dpkern.cuda_unavailable_reason())" >> "$OUT/env.txt" 2>&1
stage tests 300 tests_dist.log $PY -m pytest tests/distributed -q -ra -p no:cacheprovider -m "not slow"
if [ "${FSDP_ONLY:-0}" != 1 ]; then
  stage scaling 240 scaling.log $PY bench/dist_scaling.py --out "$OUT" --stage-timeout 90
fi
# FSDP=1 (or FSDP_ONLY=1, which skips the DDP scaling stage): tokens/s and peak memory per rank of
# DP over FSDP2 with per-parameter reductions vs reduce_at_step, ~1B and ~3B, 1 and 2 GPUs.
if [ "${FSDP:-0}" = 1 ] || [ "${FSDP_ONLY:-0}" = 1 ]; then
  stage fsdp 300 fsdp.log $PY bench/dist_scaling.py --out "$OUT/fsdp" --no-noise \
    --modes dp,dp_fsdp,dp_fsdp_at_step --stage-timeout 120
fi
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/stages.txt"
cat "$OUT/summary.txt" 2>/dev/null
