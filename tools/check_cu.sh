#!/usr/bin/env bash
# Compiles one CUDA source of the extension on its own (sm_80 and sm_90a), with
# the flags setup.py uses, to check it before listing it in csrc/sources.txt.
# Usage: bash tools/check_cu.sh csrc/<op>.cu [extra nvcc flags]
set -euo pipefail
src=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
cuda=${CUDA_HOME:-/usr/local/cuda}
inc=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))" 2>/dev/null)
py=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
out=$(mktemp -d)
"$cuda/bin/nvcc" -c "$root/$src" -o "$out/x.o" $inc -I"$py" -I"$root/csrc" \
  -DTORCH_TARGET_VERSION=0x020a000000000000 -DUSE_CUDA -std=c++17 -O3 --expt-relaxed-constexpr \
  -Xcompiler -fPIC -Xptxas=-v \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a "$@" 2>&1 \
  | grep -v "^ptxas info    : Function properties" | grep -E "error|warning|spill|registers|ptxas info    : Used" || true
test -s "$out/x.o" && echo "OK: $src compiled" || { echo "FAILED: $src"; exit 1; }
