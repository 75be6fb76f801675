#!/usr/bin/env bash
# One device call: GPU kernel tests, decode/prefill profile (fused vs plain pointwise ops), the prefill
# kernel launch sweep, and decode + prefill benchmarks. Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
COMMIT=${COMMIT:-unknown}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
t0=$(date +%s)
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - t0) )); }
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_pointwise.py tests/test_gpu_kernels.py 2>&1 | tail -4
echo "== profile ($(left) s left)"
timeout 120 python3 benchmarks/profile_decode.py --batches 1,64,256 --ctx 1024 --prefill 8192 --out "$OUT" 2>&1 | tail -100
echo "== sweep ($(left) s left)"
timeout 150 python3 benchmarks/sweep_prefill_kernels.py --out "$OUT" 2>&1 | grep -E "best|Error|error" | tail -8
echo "== bench ($(left) s left)"
[ "$(left)" -gt 100 ] && timeout $(( $(left) - 60 )) python3 benchmarks/bench_gpu.py --sections decode,prefill \
  --batches 1,8,32,64,128,256 --out "$OUT" --commit "$COMMIT" 2>&1 | grep -vE "^(decode|prefill) \{" | tail -40
echo "== graph tests ($(left) s left)"
[ "$(left)" -gt 40 ] && timeout $(( $(left) - 5 )) python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_graph.py \
  -k "not True" 2>&1 | tail -3
ls "$OUT"
