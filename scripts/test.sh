#!/usr/bin/env bash
# Sets up and runs the test suite: installs the dependencies, builds the CUDA
# extension (every kernel must compile and link when nvcc is present), prints
# which backend serves each op, and runs pytest. Fails on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q -r requirements.txt
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  export REPARAM_REQUIRE_CUDA=1  # a CUDA compile error must fail the run, not skip the extension
  # The test build compiles every kernel for the portable (sm_80) and the Hopper
  # (sm_90a) targets; wheels build all of setup.py's default list.
  export REPARAM_CUDA_ARCHS=${REPARAM_CUDA_ARCHS:-80;90a}
fi
$PY -m pip install -q --no-build-isolation -e .
$PY -m reparam_kernels env
$PY -m pytest -q --durations=15 python_tests "$@"  # (the slowest tests listed: where CI time goes)
