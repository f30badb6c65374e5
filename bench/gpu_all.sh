#!/usr/bin/env bash
# On the GPU machine, in one call: build the extension, run every test (GPU ones included) and the
# benchmarks. Writes under $OUT (default bench/results/local): env.txt, build.log, tests.log,
# bench.log, bench.json. Usage: bash bench/gpu_all.sh [extra pytest args for tests]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
# Wheels the GPU machine lacks travel in .whl/ (see README, "GPU machine").
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
{
  date -u; echo "commit ${DPKERN_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
t0=$(date +%s)
$PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || {
  echo "pip editable install failed; see build.log" ; tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
$PY -c "import dpkern; print('cuda_available', dpkern.cuda_available(), dpkern.cuda_unavailable_reason())" | tee -a "$OUT/env.txt"
$PY -m pytest ${TEST_PATHS:-tests} -q -ra -p no:cacheprovider ${TEST_ARGS:-} "$@" > "$OUT/tests.log" 2>&1
test_rc=$?
echo "tests rc=$test_rc"; tail -5 "$OUT/tests.log"
$PY -m pytest ${BENCH_PATHS:-bench} -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
bench_rc=$?
echo "bench rc=$bench_rc"; tail -3 "$OUT/bench.log"
$PY bench/summarize.py "$OUT/bench.json" | tee "$OUT/bench_summary.txt"
exit $(( test_rc | bench_rc ))
