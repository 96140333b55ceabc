#!/usr/bin/env bash
# The GPU machine's side of a measurement session, one call a stage (docs/status.md, "How to run it"):
#
#   here:  REPARAM_CUDA_ARCHS="80;90a" pip install --no-build-isolation -e .   # the extension
#          (optional, issue 6's wheel check: python3 -m pip wheel --no-build-isolation --no-deps -w dist .
#           in a clean clone, then --wheel dist/reparam_kernels-*.whl below)
#          python3 tools/carry.py pack [--wheel ...]                         # -> .carry/ (carry it)
#   there: OUT=... bash benchmarks/gpu_session.sh focus    # RUN_GPU_FOCUS run: path tests, smoke, the op
#                                                          # benchmarks with their A/B peers, memcheck, ncu
#          OUT=... bash benchmarks/gpu_session.sh decode   # issue 6: 32-layer Llama-3-8B decode, batch 1 and 16
#          OUT=... bash benchmarks/gpu_session.sh all      # both in one call (the budget split 60 / 40)
#
# GPU_SESSION_BUDGET: seconds for the stage (default focus 430, decode 280, all 560); a call's limit must leave
# ~20 s above it for the archive. GPU_SESSION_VARIANTS overrides the decode variants.
# What comes back ($OUT): <stage>.tgz (the whole results folder: JSON rows, logs, profiles) and, readable
# without unpacking, <stage>_summary.txt (decode's ends on issue 6's targets), and peers.md and targets.md after
# focus. Afterwards, here: unpack the archive and `python -m reparam_kernels bench --merge <folder>` merges its
# JSON rows over benchmarks/results/ (and remakes docs/status.md's targets table).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
STAGE="${1:-all}"
OUT="${OUT:?set OUT to the folder whose files come back}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
case "$STAGE" in
  focus) BUDGET="${GPU_SESSION_BUDGET:-430}";;
  decode) BUDGET="${GPU_SESSION_BUDGET:-280}";;
  all) BUDGET="${GPU_SESSION_BUDGET:-560}";;
  *) echo "usage: OUT=DIR bash benchmarks/gpu_session.sh [focus|decode|all]" >&2; exit 2;;
esac
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# The extension (and the wheel, if one was packed) from .carry/: a damaged copy stops the session here
# rather than every test failing for a reason the logs would hide.
"$PY" tools/carry.py unpack || exit 4
WHEEL=$("$PY" -c "import json; w = json.load(open('.carry/manifest.json'))['wheel']; print('.carry/' + w['file'] if w else '')")

RC=0
focus() {  # $1: seconds
  local dest="$OUT/focus_run"
  mkdir -p "$dest"
  OUT="$dest" RUN_GPU_FOCUS=1 RUN_GPU_BUDGET="$1" RUN_GPU_WHEEL="$WHEEL" bash benchmarks/run_gpu.sh || RC=$?
  cp "$dest/summary.txt" "$OUT/focus_summary.txt" 2>/dev/null
  cp "$dest/peers.md" "$OUT/peers.md" 2>/dev/null
  cp "$dest/targets.md" "$OUT/targets.md" 2>/dev/null
  tar czf "$OUT/focus.tgz" -C "$dest" . && rm -rf "$dest"
}

# Issue 6's decode: what each variant stands for is in docs/status.md (the next run's plan). The GQA attention
# reads the KV cache once (transformers' sdpa copies it to every query head under a static cache's mask);
# --profile 4 keeps each row's step time by kernel category (where the non-Linear time goes).
# Order: the issue's targets first (int4 at batch 1 and 16, int8, low rank at 40%; int4 with lm_head int4 too, as
# torchao's recipe does), then what they are weighed against (unfused, the off-by-default switches), then the
# issue's other kinds: a cut-short run loses those. (A 32-layer variant's compile is not known: on the CPU,
# inductor took 2.3x as long for 32 layers as for 4, and run 3's 4-layer variants took ~25 s each.)
VARIANTS="${GPU_SESSION_VARIANTS:-dense,int4_g128+fused,int8+fused,lowrank_40+fused,int4_g128+fused+head,int4_g128,int4_g128+fused:post_scale_stream_k_x_ahead,lowrank_40,lowrank_20+fused,block_circulant_b256,lowrank40_int4}"
decode() {  # $1: seconds
  local dest="$OUT/decode_run" t=$(( $1 - 15 ))
  mkdir -p "$dest"
  # bench_decode stops starting variants at its budget; the timeout is for a variant that compiles for longer
  timeout --kill-after=10 "$t" "$PY" benchmarks/bench_decode.py --batches 1,16 --attn reparam_gqa_sdpa \
    --profile 4 --variants "$VARIANTS" --budget $(( t - 60 )) --out "$dest" > "$dest/bench_decode.log" 2>&1 || RC=$?
  tail -n 25 "$dest/bench_decode.log" | tee "$OUT/decode_summary.txt"
  "$PY" -m reparam_kernels bench --targets "$dest" 2>&1 | grep -E "^\| 6 " | tee -a "$OUT/decode_summary.txt"
  tar czf "$OUT/decode.tgz" -C "$dest" . && rm -rf "$dest"
}

case "$STAGE" in
  focus) focus "$BUDGET";;
  decode) decode "$BUDGET";;
  all) focus $(( BUDGET * 6 / 10 )); decode "$(left)";;
esac
echo "gpu_session $STAGE: $(( $(date +%s) - START )) s of $BUDGET, rc=$RC; back: $(ls "$OUT" | tr '\n' ' ')"
exit "$RC"
