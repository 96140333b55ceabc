#!/usr/bin/env bash
# Does the extension built here (reparam_kernels/_C.abi3.so, stable ABI) load and pass the CPU suite
# under another torch / Python? Makes a fresh virtual environment, installs that torch with the other
# requirements, and runs `env` and pytest on a copy of the committed tree plus the built .so.
#
#   bash tools/check_torch_compat.sh PYTHON TORCH_VERSION [TRITON_VERSION] [pytest args...]
#   bash tools/check_torch_compat.sh python3.12 2.11.0 3.6.0          # as on the GPU machine
#
# Triton 3.6's CPU interpreter (used by the tests) needs NumPy < 2.4, so NumPy is capped below 2.4 here.
set -euo pipefail
py=$1; torch_version=$2; triton_version=${3:-}; shift $(( $# < 3 ? $# : 3 ))
root=$(cd "$(dirname "$0")/.." && pwd)
so=$root/reparam_kernels/_C.abi3.so
[ -f "$so" ] || { echo "build the extension first (pip install --no-build-isolation -e .)"; exit 1; }
work=$(mktemp -d)
"$py" -m venv "$work/venv"
pip="$work/venv/bin/python -m pip"
grep -v '^torch==' "$root/requirements.txt" > "$work/requirements.txt"
$pip install -q "torch==$torch_version" -r "$work/requirements.txt" "numpy<2.4"
[ -n "$triton_version" ] && $pip install -q --no-deps "triton==$triton_version"
git -C "$root" archive HEAD | tar -x -C "$work" --one-top-level=src
cp "$so" "$work/src/reparam_kernels/"
cd "$work/src"
PYTHONPATH=. "$work/venv/bin/python" -m reparam_kernels env | head -5
PYTHONPATH=. "$work/venv/bin/python" -m pytest -q -p no:cacheprovider python_tests "$@"
echo "checked in $work (remove it when done)"
