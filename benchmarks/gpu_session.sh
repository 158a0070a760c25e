#!/usr/bin/env bash
# One GPU session's checks in one call (docs/gpu-sessions.md): the CUDA tests, then every GPU
# benchmark, each step bounded so that the whole run ends by $DEADLINE_S seconds; results land in
# $OUT (default benchmarks/results) as at most 9 files: session.log (every step's output, in
# order), gpu.txt, kernels-cuda.{json,csv}, small-row-cuda.jsonl, rerank-profile-cuda.jsonl,
# stream-cuda.json, load/stream-cuda.json.
# The GPU image lacks soundfile/espeakng-loader/jiwer: carry their wheels in .whl/
# (pip download ... --python-version 3.12 --only-binary=:all: -d .whl) and they go to /tmp/site.
# DEVICE=cpu (with PYTHON=.venv/bin/python) runs the same steps on a CPU machine at CPU sizes:
# a rehearsal of the plumbing before device time is spent on it (tests/test_benchmarks.py).
set -u
# PLAN presets the variables of a call planned ahead (docs/gpu-sessions.md); any of them set in the
# environment still wins. DRY_RUN=1 prints each step's budget and command instead of running it.
case "${PLAN:-}" in
  "") ;;
  next-1)  # the first call of the next lease: what the CPU sessions built since the last one
    : "${STEPS:=tests kernels profile stream}" "${DEADLINE_S:=480}" "${TESTS_BUDGET:=150}"
    : "${TESTS_K:=cuda and (auto_runtimes or rerank or plan)}" "${KERNEL_ARGS:=--sections rerank}"
    : "${PROFILE_BUDGET:=90}" "${STREAM_BUDGET:=90}"
    : "${STREAM_ARGS:=--sizes base --streams 1,32 --formats bsr+auto,bitmap+auto --repeats 2}" ;;  # one round took 126 s
  next-2)  # then, with six minutes of the lease left: the full 10-minute load test
    : "${STEPS:=load}" "${DEADLINE_S:=330}" ;;
  next-3)  # a later call or lease: the stream counts no GPU run has timed yet (8 and 64)
    : "${STEPS:=stream}" "${DEADLINE_S:=300}" "${STREAM_BUDGET:=280}" "${STREAM_ARGS:=--sizes base --streams 8,64}" ;;
  *) echo "gpu_session.sh: unknown PLAN '$PLAN' (next-1, next-2, next-3)" >&2; exit 2 ;;
esac
OUT=${OUT:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-540}
DRY=${DRY_RUN:-0}
if [ "$DRY" = 1 ]; then  # prints the steps and writes nothing: no log, no gpu.txt, no installs
  LOG=/dev/null
else
  mkdir -p "$OUT"
  LOG="$OUT/session.log"
fi
START=$(date +%s)
export PYTHONUNBUFFERED=1 MAX_JOBS=16
if [ -d .whl ] && [ "$DEVICE" = cuda ] && [ "$DRY" != 1 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
# Uninstalled source tree (the GPU image has no venv): the two mapped packages as links, the
# layout `pip install` would give them.
if [ "$DRY" != 1 ] && ! "$PYTHON" -c "import sparse_rnnt.kernels, sparse_rnnt.csrc" 2>/dev/null; then
  ln -sfn ../kernels sparse_rnnt/kernels
  ln -sfn ../csrc sparse_rnnt/csrc
fi
# The commit the results belong to: git's, "-dirty" when the tree has edits (the device gets the
# working tree); without git on the device, pass SPARSE_RNNT_COMMIT=$(git describe --always --dirty).
if [ -z "${SPARSE_RNNT_COMMIT:-}" ]; then
  SPARSE_RNNT_COMMIT=$(git describe --always --dirty 2>/dev/null || echo unknown)
fi
export SPARSE_RNNT_COMMIT
[ "$SPARSE_RNNT_COMMIT" = unknown ] && echo "gpu_session.sh: warning: commit unknown (set SPARSE_RNNT_COMMIT)" >&2
if [ "$DEVICE" = cuda ]; then
  [ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
  XDIST="-n 12" GRAPHS="--cuda-graphs"
else
  XDIST="" GRAPHS=""
fi

# STEPS (default: all) picks steps by name; TESTS_BUDGET (default 300), PROFILE_BUDGET (default 90)
# and STREAM_BUDGET (default 120) bound the tests, profile and stream steps;
# TESTS_K replaces its -k selection (the tests a change needs first, say); KERNEL_ARGS and STREAM_ARGS replace the kernel and
# stream benchmarks' default `--quick`; LOAD_DTYPE sets the load test's weights (default bf16 on CUDA); LOAD_STEP_MODE its
# steps (default cuda-graph). All steps take more than one 600 s call. A 15-minute lease counts
# the machine's start (about 30 s on the H100 of 2026-11-26) and idle time (it goes back after
# 30 s idle). What fit there: call 1 `STEPS="tests kernels small_row" TESTS_BUDGET=230
# DEADLINE_S=440`, then at once call 2 `STEPS="stream load" DEADLINE_S=350` (the load test gets
# what the stream step leaves); the lease had held 620 of its 900 s after call 2 (whose stream
# step failed early that time).
STEPS=${STEPS:-tests kernels small_row profile stream load}
# step NAME BUDGET_S CMD...: runs CMD for at most min(BUDGET_S, time left before the deadline).
step() {
  local name=$1 budget=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  local left=$((DEADLINE_S - ($(date +%s) - START)))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$DRY" = 1 ]; then echo "$name $budget $*"; return; fi
  if [ "$budget" -le 5 ]; then echo "=== $name: skipped, no time left" >> "$LOG"; return; fi
  echo "=== $name (budget ${budget}s, t=$(( $(date +%s) - START ))s)" >> "$LOG"
  # SIGINT first: Python unwinds (torch's extension build releases its lock), SIGKILL 10 s later.
  timeout -s INT -k 10 "$budget" "$@" >> "$LOG" 2>&1
  echo "=== $name rc=$? t=$(( $(date +%s) - START ))s" >> "$LOG"
}

# CUDA tests (their CPU counterparts run under the Triton interpreter in `make test`). Failures
# print their tracebacks as they happen (tests/conftest.py) and --durations names the slow ones,
# so a run cut by its budget still says why and where the time went.
step tests ${TESTS_BUDGET:-300} env SPARSE_RNNT_FAILURES_NOW=1 "$PYTHON" -m pytest -v $XDIST --timeout 120 --durations=25 \
  -p no:cacheprovider -k "${TESTS_K:-(cuda or gpu) and not rehearsal}" tests/kernels tests/test_cuda.py tests/export tests/streaming \
  tests/training/test_distributed.py tests/test_benchmarks.py tests/pruning/test_methods.py
step kernels 150 "$PYTHON" -m benchmarks.kernels --device "$DEVICE" ${KERNEL_ARGS:---quick} --out-dir "$OUT"
step small_row 80 sh -c "\"$PYTHON\" -m benchmarks.bench_small_row --device $DEVICE --quick > $OUT/small-row-$DEVICE.jsonl"
# Where a re-rank's time goes, per kernel (benchmarks/profile_rerank.py); PROFILE_ARGS replaces its sizes and algorithms.
step profile ${PROFILE_BUDGET:-90} sh -c "\"$PYTHON\" -m benchmarks.profile_rerank --device $DEVICE \
  ${PROFILE_ARGS:---sizes 10000000,63000000 --algorithms plan-graph,plan-graph-full,plan-graph-warm} > $OUT/rerank-profile-$DEVICE.jsonl"
step stream ${STREAM_BUDGET:-120} "$PYTHON" -m benchmarks.stream --device "$DEVICE" ${STREAM_ARGS:---quick} $GRAPHS --out-dir "$OUT"
# The 64-stream load test on base; last, as it is the longest.
LOAD_WALL=$((DEADLINE_S - ($(date +%s) - START) - 40))
[ "$LOAD_WALL" -gt 300 ] && LOAD_WALL=300
[ "$DEVICE" = cuda ] && DEFAULT_MODE=cuda-graph || DEFAULT_MODE=static
step load $((LOAD_WALL + 30)) "$PYTHON" -m benchmarks.stream --device "$DEVICE" --load-only --load-minutes "${LOAD_MINUTES:-10}" \
  --max-wall-s "$LOAD_WALL" --load-step-mode "${LOAD_STEP_MODE:-$DEFAULT_MODE}" ${LOAD_DTYPE:+--load-dtype $LOAD_DTYPE} \
  --out-dir "$OUT/load"
echo "=== done t=$(( $(date +%s) - START ))s" >> "$LOG"
