#!/usr/bin/env bash
# One GPU session's checks in one call (see README, Benchmarks): the whole test suite with its
# CUDA tests, then every GPU benchmark; everything lands in $OUT (default benchmarks/results).
# The GPU image lacks soundfile/espeakng-loader/hypothesis/jiwer: carry their wheels in .whl/
# (pip download ... --python-version 3.12 --only-binary=:all: -d .whl) and they go to /tmp/site.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export SPARSE_RNNT_COMMIT=${SPARSE_RNNT_COMMIT:-unknown}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
timeout 200 python -m pytest -q tests/kernels tests/test_cuda.py tests/export tests/streaming -p no:cacheprovider \
  > "$OUT/tests-gpu.log" 2>&1
echo "tests rc=$?" >> "$OUT/tests-gpu.log"
timeout 150 python -m benchmarks.kernels --device cuda --quick --out-dir "$OUT" > "$OUT/kernels.log" 2>&1
echo "kernels rc=$?" >> "$OUT/kernels.log"
timeout 60 python -m benchmarks.bench_small_row --device cuda --quick > "$OUT/small_row.jsonl" 2>&1
timeout 120 python -m benchmarks.stream --device cuda --quick --out-dir "$OUT" > "$OUT/stream.log" 2>&1
echo "stream rc=$?" >> "$OUT/stream.log"
# The 64-stream load test on base (10 minutes of audio per stream); last, as it is the longest.
timeout 240 python -m benchmarks.stream --device cuda --quick --load-minutes 10 --out-dir "$OUT/load" > "$OUT/load.log" 2>&1
echo "load rc=$?" >> "$OUT/load.log"
