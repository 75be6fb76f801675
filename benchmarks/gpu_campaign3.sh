#!/usr/bin/env bash
# One device call: the full decode/prefill/memory/video benchmark at the current commit, then the GPU
# tests (kernels, pointwise, graph replay and greedy tracking, eager and compiled). Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
COMMIT=${COMMIT:-unknown}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
t0=$(date +%s)
left() { echo $(( ${BUDGET:-580} - ($(date +%s) - t0) )); }
timeout 330 python3 benchmarks/bench_gpu.py --sections check,decode,prefill,video --batches 1,8,32,64,128,256 \
  --out "$OUT" --commit "$COMMIT" 2>&1 | grep -vE "^(decode|prefill|memory|video|check) \{" | tail -60
echo "== tests ($(left) s left)"
timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider tests/test_gpu_pointwise.py tests/test_gpu_kernels.py \
  tests/test_gpu_capture_sizes.py tests/test_gpu_graph.py 2>&1 | tail -4
ls "$OUT"
