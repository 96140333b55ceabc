#!/usr/bin/env bash
# Installs a built wheel from its file into an empty directory and runs tests against it from outside the
# source tree, so that the package under test is the wheel's (its _C.abi3.so), not the checkout's: issue 6's
# "installed from the file and its GPU tests passed". Nothing is downloaded: torch, Triton and the rest come
# from the interpreter's own packages (pip install --target --no-deps; the directory goes first on PYTHONPATH).
#
#   bash tools/check_wheel.sh dist/reparam_kernels-*.whl [TEST ...] [-- PYTEST OPTIONS]
#
# TESTs are files or node ids under python_tests/. Without any: with a GPU, the GPU tests of the files in
# GPU_TESTS below (-m gpu); without one, a CPU subset (the extension's registration, one op, compile).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash tools/check_wheel.sh WHEEL [TEST ...] [-- PYTEST OPTIONS]" >&2; exit 2; }
wheel=$(realpath "$1"); shift
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
tests=(); opts=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; opts=("$@"); break; fi
  tests+=("$root/python_tests/$1"); shift
done
work=$(mktemp -d)
if ! "$PY" -m pip install -q --no-deps --no-index --target "$work/site" "$wheel"; then
  # (no pip on the interpreter: a wheel is a zip laid out as site-packages; unpacking it installs the same files)
  echo "check_wheel: pip failed; unpacking the wheel instead" >&2
  "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheel" "$work/site"
fi
cd "$work"  # outside the checkout: `import reparam_kernels` must find the wheel's copy
export PYTHONPATH="$work/site"
"$PY" - "$work/site" <<'EOF'
import os, sys
import reparam_kernels
where = os.path.realpath(reparam_kernels.__file__)
assert where.startswith(os.path.realpath(sys.argv[1])), f"reparam_kernels imported from {where}, not the wheel"
print(f"check_wheel: reparam_kernels {reparam_kernels.__version__} from {os.path.dirname(where)}")
EOF
"$PY" -m reparam_kernels env
GPU_TESTS=(test_cuda_paths_gpu.py test_quant_small_m_gpu.py test_lowrank_small_m_gpu.py test_compile_all_layers.py)
if [ ${#tests[@]} -eq 0 ]; then
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    for t in "${GPU_TESTS[@]}"; do tests+=("$root/python_tests/$t"); done
    opts=(-m gpu "${opts[@]}")
  else
    tests=("$root/python_tests/test_cli_env.py" "$root/python_tests/test_lowrank_op.py"
           "$root/python_tests/test_compile_all_layers.py" "$root/python_tests/test_export.py")
  fi
fi
"$PY" -m pytest -q -p no:cacheprovider --rootdir "$root" -c "$root/pytest.ini" "${tests[@]}" "${opts[@]}"
