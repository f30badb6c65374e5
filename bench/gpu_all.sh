#!/usr/bin/env bash
# On the GPU machine, in one call: build the extension, run every test (GPU ones included), the
# microbenchmarks and the end-to-end / audit / job scripts. Writes under $OUT (default
# bench/results/local): env.txt, build.log, tests.log, bench.log, bench.json, bench_summary.txt and
# one folder or log per script stage.
#
#   bash bench/gpu_all.sh                      # every stage
#   STAGES="tests e2e" bash bench/gpu_all.sh   # a subset (build always runs)
#   STAGES="subspace denoise rmt" ...          # on request: projected vs full step, denoiser calls,
#                                              # the denoised step's host / GPU split
#   STAGES="phases" ...                        # on request: small steps' host phases (host_phases)
#   STAGES="probe" PROBE_ARGS="--graph ..."     # on request: book-keeping configs (bk_probe.py)
# After a run, on CPU: python bench/history.py merge <run>/history.jsonl (bench/README.md).
# Knobs: TEST_PATHS, TEST_ARGS, BENCH_PATHS, BENCH_ARGS, E2E_ARGS, PROBE_ARGS, STAGE_TIMEOUT (s per stage),
# BUDGET_S (s for the whole call, shared among the stages; `make bench-gpu` sets 560).
# A stage that fails is logged and the next one still runs; the exit code ORs every stage's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export DPKERN_BENCH_OUT="$OUT"
PY=${PYTHON:-python3}
STAGES=${STAGES:-"tests bench e2e profile audit job report"}
TMO=${STAGE_TIMEOUT:-540}
T_END=$(( $(date +%s) + ${BUDGET_S:-0} ))  # the budget counts from here: wheels and build included
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

# BUDGET_S: the whole call's limit in seconds (set by `make bench-gpu`). Each stage then gets the
# remaining time times its weight over the weights of the stages still to run (capped by TMO); the
# benchmark harness skips cases past its deadline (reported as skipped) and e2e_step.py drops the
# cases past its --budget-s, so the call ends inside the budget.
declare -A WEIGHT=([tests]=4 [bench]=9 [e2e]=8 [profile]=3 [audit]=3 [job]=2 [report]=1 [subspace]=2 [denoise]=1 [rmt]=1 [phases]=2 [probe]=2)
LEFT_STAGES=" $STAGES "
limit_for() {  # limit_for NAME: this stage's seconds
  if [ -z "${BUDGET_S:-}" ]; then echo "$TMO"; return; fi
  local w=0 s; for s in $LEFT_STAGES; do w=$(( w + ${WEIGHT[$s]:-1} )); done
  local left=$(( T_END - $(date +%s) )); [ "$left" -lt 1 ] && left=1
  local l=$(( left * ${WEIGHT[$1]:-1} / (w > 0 ? w : 1) )); [ "$l" -lt 1 ] && l=1
  echo $(( l < TMO ? l : TMO ))
}
rc=0
LIM=$TMO
stage() {  # stage NAME LOG CMD...: run with a time limit, log, report, never stop the script
  # At the limit the stage gets SIGINT (KeyboardInterrupt: pytest still writes its JSON and
  # history of the cases that ran), and SIGKILL 20 s later if it has not ended.
  local name=$1 log=$2; shift 2
  local s0; s0=$(date +%s)
  timeout -s INT -k 20 "$LIM" "$@" > "$log" 2>&1
  local r=$?
  echo "$name rc=$r ($(( $(date +%s) - s0 )) s)"; tail -4 "$log"
  rc=$(( rc | r ))
}
for s in $STAGES; do
  LIM=$(limit_for "$s")
  LEFT_STAGES=${LEFT_STAGES/ $s / }
  case $s in
    tests) stage tests "$OUT/tests.log" $PY -m pytest ${TEST_PATHS:-tests} -q -ra -p no:cacheprovider ${TEST_ARGS:-} ;;
    # No case starts in the last eighth of the stage (>= 45 s): the slowest cases (a 1B-model
    # step, all matrices of a 1B model) take ~30 s with their set-up.
    bench) DPKERN_BENCH_DEADLINE=$(( $(date +%s) + LIM - (LIM / 8 > 45 ? LIM / 8 : 45) )) \
           DPKERN_BENCH_HISTORY="$OUT/history.jsonl" stage bench "$OUT/bench.log" \
             $PY -m pytest ${BENCH_PATHS:-bench} -q -p no:cacheprovider \
             --benchmark-json="$OUT/bench.json" ${BENCH_ARGS:-}
           [ -f "$OUT/bench.json" ] && $PY bench/summarize.py "$OUT/bench.json" > "$OUT/bench_summary.txt" ;;
    e2e)   stage e2e "$OUT/e2e_step.log" $PY bench/e2e_step.py --out "$OUT/e2e/e2e_step.json" \
             --budget-s $(( LIM > 40 ? LIM - 30 : 10 )) ${E2E_ARGS:-} ;;
    profile) stage profile "$OUT/profile.log" $PY bench/profile_step.py --out "$OUT/profile_1b" --preset 1b ;;
    report) stage report "$OUT/readme_section.md" $PY bench/perf_report.py --run "$OUT" --out "$OUT/perf" ;;
    audit) stage audit "$OUT/audit_gpu.log" $PY bench/audit_gpu.py --device cuda --m 30000 --out "$OUT/audit" ;;
    job)   stage job "$OUT/finetune_gpu.log" $PY -m dpkern finetune --device cuda --output-dir "$OUT/finetune" ${JOB_ARGS:-} ;;
    # on request (not in the default STAGES): the projected step against the full one (issue 7),
    # the denoiser's calls alone and the denoised step's host / GPU split (issue 8)
    subspace) stage subspace "$OUT/subspace_probe.log" $PY bench/subspace_probe.py --out "$OUT/subspace_probe" \
             --parts steps --modes ${SUBSPACE_MODES:-full,subspace-16,subspace-64} --steps 8 ;;
    rmt)   stage rmt "$OUT/rmt_probe.log" $PY -m bench.rmt_step_probe --case ${RMT_CASE:-8x512} \
             --precision ${RMT_PRECISION:-bf16} --out "$OUT/rmt_probe" ;;
    # on request: the small host-bound cases' steps split into host phases, both modes in rounds
    phases) stage phases "$OUT/host_phases.log" $PY -m bench.host_phases --out "$OUT/host_phases.json" \
             --cases ${PHASES_CASES:-8x128,2x512} --precisions ${PHASES_PRECISIONS:-fp32-tf32,bf16} \
             ${PHASES_ARGS:-} ;;
    # on request: the book-keeping kernel's configs against torch.matmul (bk_probe.py)
    probe) stage probe "$OUT/bk_probe.log" $PY bench/bk_probe.py --out "$OUT/bk_probe.json" ${PROBE_ARGS:-} ;;
    denoise) stage denoise "$OUT/denoise.log" $PY -m pytest bench/bench_denoise.py -q -p no:cacheprovider \
             -k "test_denoise_steps and not adaptive and not warm6" --benchmark-json="$OUT/denoise_steps.json" ;;
    *)     echo "unknown stage $s"; rc=1 ;;
  esac
done
exit $rc
