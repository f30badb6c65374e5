# The two commands of the README. Both set everything up first (idempotent: scripts/setup_env.sh).
.PHONY: run test setup bench bench-gpu

setup:
	scripts/setup_env.sh

# The main job: private fine-tuning of MiniLM on SST-2 (ε=3, δ=1e-5) with the embedded defaults
# (dpkern/finetune/config.py); ARGS passes options through, e.g. make run ARGS=--compare-nonprivate
run: setup
	.venv/bin/python -m dpkern finetune $(ARGS)

# The whole test suite (CI runs exactly this through .ci/run). pytest exits 5 when it collects
# nothing, which fails here like any other error.
test: setup
	.venv/bin/python -m pytest -q

# Benchmarks: a quick correctness-only pass on CPU; full timings on a GPU.
bench: setup
	.venv/bin/python -m pytest bench -q

# On the GPU machine, one call under 10 minutes: the microbenchmarks, the end-to-end sweep, the
# profile and the README section (writes under $$OUT; cases past the budget are reported skipped).
# The stages that end early run first (e2e stops at its own share, the profile takes ~25 s), so the
# microbenchmarks get what they leave. e2e times 8 steps after 3 warm-up (3 steps were too few:
# one collector pause moved a median by 30%). The GPU tests and the other stages: bash bench/gpu_all.sh.
bench-gpu:
	BUDGET_S=$${BUDGET_S:-560} STAGES="$${STAGES:-e2e profile bench report}" \
	E2E_ARGS="$${E2E_ARGS:---steps 8 --warmup 3}" bash bench/gpu_all.sh
