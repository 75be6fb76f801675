#!/usr/bin/env bash
# One device call for the prefill kernels: GPU kernel tests, the launch sweep of the SWA and conv
# prefill kernels, the prefill profile (8K chunk at context 8K, 32K prompt) and the prefill table of
# bench_gpu.py. Results under $OUT.
set -uo pipefail
source benchmarks/device_setup.sh
echo "== kernel tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 | tail -3
echo "== sweep ($(left) s left)"
timeout 200 python3 benchmarks/sweep_prefill_kernels.py --out "$OUT" 2>&1 | grep -E "^best|error" | tail -8
echo "== profile ($(left) s left)"
timeout $(( $(left) - 100 )) python3 benchmarks/profile_prefill.py --out "$OUT" 2>&1 | tail -75
echo "== bench prefill ($(left) s left)"
timeout $(( $(left) - 5 )) python3 benchmarks/bench_gpu.py --sections prefill --out "$OUT" --commit "$COMMIT" 2>&1 \
  | grep -E "^prefill" | tail -8
ls "$OUT"
