#!/usr/bin/env bash
# One go on a GPU machine: environment report, GPU tests, every benchmark (--quick),
# compute-sanitizer over every op. Nothing is installed and no network is needed:
# the extension (reparam_kernels/_C.abi3.so) is built beforehand on a CPU machine
# with nvcc and travels with the tree.
#
#   bash benchmarks/run_gpu.sh            # results into $OUT if set, else benchmarks/results/
#   RUN_GPU_BUDGET=480 RUN_GPU_FULL=1 bash benchmarks/run_gpu.sh   # full shapes instead of --quick
#   OUT=/tmp/res RUN_GPU_ARCHIVE=/somewhere/results.tgz bash benchmarks/run_gpu.sh   # + one archive
#   RUN_GPU_WHEEL=dist/reparam_kernels-*.whl bash benchmarks/run_gpu.sh   # the newest tests against the installed wheel
#   RUN_GPU_FOCUS=1 RUN_GPU_BUDGET=540 bash benchmarks/run_gpu.sh   # ~9 min: the path tests only, bench_quant / bench_lowrank / bench_structured /
#       bench_decode (batch 1 and 16), memcheck over the path cases (no racecheck), Nsight Compute with stall reasons on
#       int4, low rank (also with the small-M ring) and block-circulant at M = 1, 16, 64, 128: the measurements
#       that decide the open path choices (RUN_GPU_MOE=1 adds bench_moe — formats RUN_GPU_MOE_FORMATS, default
#       int4,lowrank — and bench_decode on the Mixtral and Qwen3-MoE configurations)
#
# Output folder: env.txt, gpu_tests_new.log/.xml (the newest paths' tests), gpu_tests.log/.xml, bench_<name>.log, <gpu>/<op>.json,
# sanitizer.log, racecheck.log, ncu.csv (Nsight Compute: one call of each decode kernel and of cuBLAS; focus also
# ncu_source_int4_m1.csv: int4's M = 1 kernel as SASS with its sampled stalls),
# benchmarks.md + roofline_<gpu>.png (table and plot of the JSON), peers.md (each A/B peer against the default),
# targets.md (the issues' speed targets over this run's rows), summary.txt.
# Exit status: 1 if the GPU tests fail, 2 if compute-sanitizer reports errors, 3 if a
# benchmark script fails, else 0 (the first of these that applies).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DEST="${OUT:-$REPO/benchmarks/results}"
mkdir -p "$DEST"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export REPARAM_BENCH_OUT="$DEST"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"  # python3 first: some images have no plain `python`
BUDGET="${RUN_GPU_BUDGET:-470}"   # seconds for everything; steps are cut to fit
START=$(date +%s)
QUICK="--quick"; [ "${RUN_GPU_FULL:-0}" = 1 ] && QUICK=""
FOCUS="${RUN_GPU_FOCUS:-0}"
SUMMARY="$DEST/summary.txt"; : > "$SUMMARY"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME MAX_SECONDS LOG cmd...: run cmd with a timeout of min(MAX, time left - reserve).
RESERVE=20
step() {
  local name="$1" max="$2" log="$3"; shift 3
  local t=$(( $(left) - RESERVE )); [ "$t" -gt "$max" ] && t="$max"
  if [ "$t" -lt 15 ]; then note "SKIP $name: out of time budget"; return 124; fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" > "$log" 2>&1
  local rc=$?
  note "$name: exit $rc in $(( $(date +%s) - t0 )) s (limit $t s) -> $(basename "$log")"
  return $rc
}

note "run_gpu.sh $(date -u +%FT%TZ) budget ${BUDGET}s repo $REPO"
# RUN_GPU_WHEEL=FILE: the wheel built on a CPU machine (issue 6): its _C.abi3.so serves the tree (unpacked
# when the tree has none), and the newest paths' GPU tests run against the wheel installed from the file
# (tools/check_wheel.sh: outside the tree, the wheel's package imported).
WHEEL="${RUN_GPU_WHEEL:-}"
if [ -n "$WHEEL" ] && ! ls reparam_kernels/_C*.so >/dev/null 2>&1; then
  "$PY" -c "import sys, zipfile; open('reparam_kernels/_C.abi3.so', 'wb').write(zipfile.ZipFile(sys.argv[1]).read('reparam_kernels/_C.abi3.so'))" \
    "$WHEEL" && note "extension unpacked from $(basename "$WHEEL")"
fi
if ! ls reparam_kernels/_C*.so >/dev/null 2>&1; then
  note "WARNING: reparam_kernels/_C*.so is not in the tree: CUDA kernels will not run (Triton/reference only)"
fi

step env 60 "$DEST/env.txt" "$PY" -m reparam_kernels env; cat "$DEST/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$DEST/env.txt" 2>&1

# Smoke-test each kernel path added in sessions 5, 6, 10, 13, 15, 27, 33, 37, 39 and 41 (x-ahead, stream-K, post-scale,
# the low-rank GEMV pair: off by default;
# a failure sets their variable to 0, which also drops their bench peers) in its own process first (vq_linear's
# pairs, the grouped ops' small-M kernel, the transposed small-M tile and the small-M ring before the rest of the small-M path, so that a failure
# switches off only them; the ring's smoke cases switch it on, and a failure sets it to 0, which also drops
# bench_quant's ring peers). A path
# that crashes or computes wrong on the GPU is switched off (its variable) for the rest of the run, so
# one bad kernel cannot take every later test and benchmark down with a sticky CUDA error;
# smoke_<path>.log says why. A failure with no sign of the GPU in it (a Python error building a layer)
# leaves the path on: switching it off cost the first H200 run every small-M and wgmma test.
for pair in "gemv:REPARAM_LOWRANK_GEMV" "post-scale:REPARAM_SMALL_M_POST_SCALE" "x-ahead:REPARAM_SMALL_M_X_AHEAD" "stream-K:REPARAM_SMALL_M_STREAM_K" "vq-pairs:REPARAM_VQ_SMALL_M" "grouped:REPARAM_GROUPED_SMALL_M" "transposed:REPARAM_SMALL_M_T" "ring:REPARAM_SMALL_M_RING" "small-M:REPARAM_SMALL_M" "wgmma:REPARAM_WGMMA" "dequant-pieces:REPARAM_DEQUANT_SCRATCH_MB" "dequant:REPARAM_DEQUANT_MIN_M" "two-GEMM:REPARAM_LOWRANK_CUBLAS_MIN_M" "cols-8-rows:REPARAM_BC_COLS_TILE_ROWS" "cols-wide:REPARAM_BC_COLS_WIDE" "cols:REPARAM_BC_COLS_MAX_M"; do
  match="${pair%%:*}"; var="${pair##*:}"
  if ! timeout 90 "$PY" benchmarks/sanitize_ops.py --paths-only --match "$match" > "$DEST/smoke_$match.log" 2>&1; then
    if grep -qiE "CUDA error|AcceleratorError|illegal|launch failure|relative error|FAIL|Killed|Terminated" \
        "$DEST/smoke_$match.log" || ! grep -q "Traceback" "$DEST/smoke_$match.log"; then
      export "$var=0"
      note "SMOKE FAIL: the '$match' path failed its smoke run (smoke_$match.log): $var=0 for the rest of this run"
    else
      note "SMOKE FAIL (a Python error, not the GPU: path left on): '$match' (smoke_$match.log)"
    fi
  else
    note "smoke $match: ok"
  fi
done

# The newest paths' test files first, in their own step (a step cut at its limit still leaves the
# results it got), then every other GPU test.
# Newest first: the step's limit cuts the last ones (the 2026-12-04 run reached 633 of ~710 in 120 s).
NEW_TESTS="python_tests/test_grouped_lowrank_op.py python_tests/test_grouped_experts.py python_tests/test_grouped_ops.py
  python_tests/test_experts.py python_tests/test_cuda_paths_gpu.py python_tests/test_lowrank_large_m.py
  python_tests/test_quant_small_m_gpu.py python_tests/test_lowrank_small_m_gpu.py python_tests/test_gptvq.py
  python_tests/test_triton_quant_gpu.py python_tests/test_gptq_table.py python_tests/test_correction.py python_tests/test_generate.py
  python_tests/test_factor_device.py python_tests/test_fisher_blockwise.py python_tests/test_block_circulant_cols_op.py
  python_tests/test_quant_dequant_mm_gpu.py python_tests/test_wgmma_gpu.py python_tests/test_int4_checkpoints.py
  python_tests/test_ct_checkpoints.py python_tests/test_int4_checkpoint_experts.py python_tests/test_gguf_int4.py"
IGNORE=(); for f in $NEW_TESTS; do IGNORE+=("--ignore=$f"); done
if [ -n "$WHEEL" ]; then
  step gpu_tests_new 130 "$DEST/gpu_tests_new.log" env PYTHON="$PY" bash tools/check_wheel.sh "$WHEEL" \
    ${NEW_TESTS//python_tests\//} -- -m gpu --continue-on-collection-errors --junitxml="$DEST/gpu_tests_new.xml"
else
  step gpu_tests_new 120 "$DEST/gpu_tests_new.log" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
    --continue-on-collection-errors $NEW_TESTS --junitxml="$DEST/gpu_tests_new.xml"
fi
NEW_RC=$?
tail -n 8 "$DEST/gpu_tests_new.log"
TESTS_RC=0
if [ "$FOCUS" != 1 ]; then
  step gpu_tests 110 "$DEST/gpu_tests.log" "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    "${IGNORE[@]}" python_tests --junitxml="$DEST/gpu_tests.xml"
  TESTS_RC=$?
  tail -n 25 "$DEST/gpu_tests.log"
fi
[ "$NEW_RC" -ne 0 ] && TESTS_RC=$NEW_RC
# compress()'s factorizations of an 8B model's layers in float64 on the GPU (session 21; not in focus: its 40 s go to
# the benchmarks; JSON lines, not a
# results file that bench --merge would read)
[ "$FOCUS" != 1 ] && step factor_time 40 "$DEST/factor_time.jsonl" "$PY" benchmarks/factor_time.py --device cuda
# A file that fails to import fails the run (non-zero) without stopping the other GPU tests;
# pytest exit 5 = no test selected: no GPU test exists, which is a failure of this run too.

BENCH_RC=0
# The per-op benchmarks first, the end-to-end decode (slow to compile) last.
SCRIPTS=()
for s in benchmarks/bench_*.py; do [ "$s" != benchmarks/bench_decode.py ] && SCRIPTS+=("$s"); done
# focus: the issues' targets only, unless RUN_GPU_MOE=1 adds the mixture-of-experts ones (bench_moe and the MoE
# decode): seven scripts would leave each a share too short for bench_quant's peers
MOE="${RUN_GPU_MOE:-0}"; [ "$FOCUS" != 1 ] && MOE=1
# (bench_quant after the two that finish inside their shares: it takes what they leave; on 2026-12-04 its
# even share of 42 s covered 20 of its 40 cases)
[ "$FOCUS" = 1 ] && SCRIPTS=(benchmarks/bench_lowrank.py benchmarks/bench_structured.py benchmarks/bench_quant.py)
[ "$FOCUS" = 1 ] && [ "$MOE" = 1 ] && SCRIPTS+=(benchmarks/bench_moe.py)
[ -f benchmarks/bench_decode.py ] && SCRIPTS+=(benchmarks/bench_decode.py)
# (SCRIPT:MODEL: bench_decode on another --model; the MoE models last, the newest)
[ -f benchmarks/bench_decode.py ] && [ "$MOE" = 1 ] && SCRIPTS+=(benchmarks/bench_decode.py:mixtral_8x7b
  benchmarks/bench_decode.py:qwen3_30b_a3b)
SAN_RESERVE=150   # keep this much for compute-sanitizer (memcheck <= 80 s, racecheck <= 30 s) and Nsight Compute (<= 40 s)
[ "$FOCUS" = 1 ] && SAN_RESERVE=200   # no racecheck; ncu up to 90 s (~30 kernels) and its source view 45 s
for i in "${!SCRIPTS[@]}"; do
  script="${SCRIPTS[$i]}"; model=""
  case "$script" in *:*) model="${script##*:}"; script="${script%%:*}";; esac
  name="$(basename "$script" .py)${model:+_$model}"
  # an even share of what is left, at most 150 s a script; results are saved row by row,
  # so a script cut short still leaves what it measured (its JSON says "partial": true)
  share=$(( ($(left) - RESERVE - SAN_RESERVE) / (${#SCRIPTS[@]} - i) )); [ "$share" -gt 150 ] && share=150
  EXTRA=()  # focus: decode at batch 16 too (issue 6's int4 target there), within the step's share
  # and each row's kernel time by category over 8 more steps (where a layer's non-Linear time goes)
  [ "$FOCUS" = 1 ] && [ "$name" = bench_decode ] && EXTRA=(--batches 1,16 --profile 8 --budget $(( share - 30 )))
  # focus: fp16 only (the targets' dtype), so the A/B peers of every case fit the script's share
  [ "$FOCUS" = 1 ] && [ "${name#bench_decode}" = "$name" ] && EXTRA=(--dtypes fp16)
  [ -n "$model" ] && EXTRA+=(--model "$model" --budget $(( share - 30 )))
  # the MoE layers: int4 (issue 3's format) and low rank (the default recipe's; its CUDA kernel since session 35)
  [ "$name" = bench_moe ] && EXTRA+=(--formats "${RUN_GPU_MOE_FORMATS:-int4,lowrank}")
  step "$name" "$share" "$DEST/$name.log" "$PY" "$script" $QUICK "${EXTRA[@]}" || BENCH_RC=$?
  tail -n 4 "$DEST/$name.log" 2>/dev/null  # (no log when the step was skipped)
done

SAN_RC=0
for d in "${CUDA_HOME:-}" /usr/local/cuda; do  # the toolkit's bin is not always on PATH
  [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && PATH="$PATH:$d/bin"
done
if command -v compute-sanitizer >/dev/null 2>&1; then
  # no caching allocator: an out-of-bounds access inside a cached block would go unseen
  SAN_ARGS=(); [ "$FOCUS" = 1 ] && SAN_ARGS=(--paths-only)
  step sanitizer 80 "$DEST/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 99 \
    --target-processes all "$PY" benchmarks/sanitize_ops.py "${SAN_ARGS[@]}"
  SAN_RC=$?
  grep -E "ERROR SUMMARY|FAIL|sanitize_ops: ops" "$DEST/sanitizer.log" | tail -n 5
  # shared-memory races in the paths with in-CTA reductions and split fixups (small, so it is quick)
  RACE_RC=0
  [ "$FOCUS" != 1 ] && { step racecheck 30 "$DEST/racecheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool racecheck --error-exitcode 98 \
    --target-processes all "$PY" benchmarks/sanitize_ops.py --paths-only; RACE_RC=$?; }
  grep -E "ERROR SUMMARY|FAIL" "$DEST/racecheck.log" | tail -n 3
  [ "$SAN_RC" -eq 0 ] && [ "$RACE_RC" -ne 124 ] && SAN_RC=$RACE_RC
else
  note "compute-sanitizer not found on PATH: memcheck skipped"; SAN_RC=127
fi

# Nsight Compute on one call of each kernel and of cuBLAS at the same shape, M = 1 and 256 (benchmarks/profile_ops.py):
# achieved DRAM bandwidth, occupancy, launch shape. Informational: its exit status fails nothing.
if ! command -v ncu >/dev/null 2>&1; then  # not always linked into the toolkit's bin
  for n in "${CUDA_HOME:-/usr/local/cuda}"/nsight-compute*/ncu /usr/local/cuda/nsight-compute*/ncu /opt/nvidia/nsight-compute/*/ncu; do
    [ -x "$n" ] && PATH="$PATH:$(dirname "$n")" && break
  done
fi
if command -v ncu >/dev/null 2>&1; then
  # ComputeWorkloadAnalysis ("Issue Slots Busy") and InstructionStats check the instruction budget that
  # tools/sass_budget.py predicts for the decode loops (docs/benchmarks.md, "Instruction budget").
  # Focus: where the warps wait (WarpStateStats, SchedulerStats) in the kernels whose targets are furthest,
  # the small-M kernels also with their shared-memory ring (--ring), and block-circulant decode (1.19x
  # measured at M = 1 against a predicted 3-4x: its time is latency, which the stall reasons locate).
  # The stall reasons as metrics: the WarpStateStats section's breakdown is a chart, absent from the details page's
  # CSV (the 2026-12-04 run got an empty row), so the per-reason averages are asked for by name.
  NCU_MORE=(); PROFILE=(--m 1,256); NCU_MAX=60
  [ "$FOCUS" = 1 ] && NCU_MORE=(--section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis_Tables
    --metrics "regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$") \
    && PROFILE=(--m 1,16,64,128 --kinds int4_g128,lowrank_40,block_circulant_b256 --ring --x-ahead --post-scale) && NCU_MAX=90
  # --clock-control none: the GPU's own clocks, as the benchmarks ran (ncu's default locks the base clock:
  # the 2026-12-04 run's profiles read 1.35 GHz SM clocks, durations ~1.4x the benchmarks')
  step ncu "$NCU_MAX" "$DEST/ncu.log" ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    --section ComputeWorkloadAnalysis --section InstructionStats "${NCU_MORE[@]}" --csv --page details \
    --log-file "$DEST/ncu.csv" "$PY" benchmarks/profile_ops.py "${PROFILE[@]}"
  # Focus: where int4's M = 1 kernel waits, instruction by instruction (PC sampling: SourceCounters; the source
  # page as SASS), with x prefetched into L1 a stage ahead off and on, then with the scales after the mma (its
  # three calls, in that order). At M = 1 that kernel ran at 1.9 TB/s with 0.75 eligible warps a scheduler and
  # its stalls unrecorded.
  [ "$FOCUS" = 1 ] && step ncu_source 55 "$DEST/ncu_source.log" ncu --clock-control none --nvtx --nvtx-include "profile/" \
    --kernel-name regex:small_m_kernel --section SourceCounters --section WarpStateStats --page source \
    --print-source sass --csv --log-file "$DEST/ncu_source_int4_m1.csv" \
    "$PY" benchmarks/profile_ops.py --m 1 --kinds int4_g128 --x-ahead --post-scale
else
  note "ncu not found on PATH: kernel profiles skipped"
fi

"$PY" -m reparam_kernels bench --render-only --out "$DEST" --docs "$DEST/benchmarks.md" \
  --status-doc "$DEST/targets.md" > /dev/null 2>&1 && note "tables: $DEST/benchmarks.md" || note "rendering the tables failed"
# each A/B peer (the switches' paths) against the op's default over this run's rows: which switches won
"$PY" -m reparam_kernels bench --peers "$DEST" > "$DEST/peers.md" 2>&1 && note "peers: $DEST/peers.md" \
  && head -n 14 "$DEST/peers.md" || note "the peer summary failed (peers.md)"
# the issues' speed targets over this run's rows alone (met / missed / which peer would meet it)
"$PY" -m reparam_kernels bench --targets "$DEST" > "$DEST/targets.md" 2>&1 && note "targets: $DEST/targets.md" \
  && grep -E "\| met|meets it|targets met" "$DEST/targets.md" || note "the targets check failed (targets.md)"

note "total $(( $(date +%s) - START )) s; gpu_tests rc=$TESTS_RC sanitizer rc=$SAN_RC benchmarks rc=$BENCH_RC"
# RUN_GPU_ARCHIVE=FILE: the whole output folder as one .tgz too (where only a few files come back)
[ -n "${RUN_GPU_ARCHIVE:-}" ] && tar czf "$RUN_GPU_ARCHIVE" -C "$DEST" . && echo "archive: $RUN_GPU_ARCHIVE"
[ "$TESTS_RC" -ne 0 ] && exit 1
[ "$SAN_RC" -ne 0 ] && exit 2
[ "$BENCH_RC" -ne 0 ] && exit 3
exit 0
