#!/usr/bin/env bash
# Idempotent set-up: .venv with the pinned CPU environment, then dpkern installed editable with its
# CUDA extension built by setup.py/CMake (skipped with a warning when there is no nvcc).
# A second run reinstalls nothing unless requirements-cpu.txt or the build inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
req_stamp=".venv/.req-$(sha256sum requirements-cpu.txt | cut -c1-16)"
if [ ! -f "$req_stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-cpu.txt
  rm -f .venv/.req-*; touch "$req_stamp"
fi
build_hash=$(cat setup.py CMakeLists.txt pyproject.toml $(find csrc -type f | sort) | sha256sum | cut -c1-16)
build_stamp=".venv/.build-$build_hash"
if [ ! -f "$build_stamp" ] || ! .venv/bin/python -c "import dpkern" 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
  rm -f .venv/.build-*; touch "$build_stamp"
fi
