#!/usr/bin/env bash
# One device call: the full decode/prefill/memory/video benchmark at the current commit, then the GPU
# tests (kernels, pointwise, graph replay and greedy tracking, eager and compiled). Results under $OUT.
set -uo pipefail
source benchmarks/device_setup.sh
timeout 330 python3 benchmarks/bench_gpu.py --sections check,decode,prefill,video --batches 1,8,32,64,128,256 \
  --out "$OUT" --commit "$COMMIT" 2>&1 | grep -vE "^(decode|prefill|memory|video|check) \{" | tail -60
echo "== tests ($(left) s left)"
timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider tests/test_gpu_pointwise.py tests/test_gpu_kernels.py \
  tests/test_gpu_capture_sizes.py tests/test_gpu_graph.py 2>&1 | tail -4
ls "$OUT"
