#!/usr/bin/env bash
# One device call: GPU kernel tests, the decode GEMM sweep (cuBLAS vs Triton skinny GEMM), then prefill,
# memory and video benchmarks. Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
COMMIT=${COMMIT:-unknown}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
t0=$(date +%s)
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - t0) )); }
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_pointwise.py tests/test_gpu_kernels.py tests/test_model_vision.py 2>&1 | tail -4
echo "== bench ($(left) s left)"
timeout 300 python3 benchmarks/bench_gpu.py --sections prefill,memory,video --out "$OUT" --commit "$COMMIT" 2>&1 \
  | grep -vE "^(prefill|memory|video) \{" | tail -40
echo "== gemm sweep ($(left) s left)"
[ "$(left)" -gt 30 ] && timeout $(( $(left) - 5 )) python3 benchmarks/sweep_gemm.py --out "$OUT" 2>&1 | grep -E "^M=|Error" | tail -8
ls "$OUT"
