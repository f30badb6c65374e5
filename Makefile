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
# The GPU tests and the other stages: bash bench/gpu_all.sh (STAGES=..., BUDGET_S=...).
bench-gpu:
	BUDGET_S=$${BUDGET_S:-570} STAGES="$${STAGES:-bench e2e profile report}" bash bench/gpu_all.sh
