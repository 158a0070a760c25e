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
timeout 300 python -m pytest -q -x tests/kernels tests/test_cuda.py -p no:cacheprovider > "$OUT/tests-gpu.log" 2>&1
echo "kernel tests rc=$?" >> "$OUT/tests-gpu.log"
timeout 240 python -m benchmarks.kernels --device cuda --out-dir "$OUT" > "$OUT/kernels.log" 2>&1
echo "kernels rc=$?" >> "$OUT/kernels.log"
