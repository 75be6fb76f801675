#!/usr/bin/env bash
# One device call for kernel work: the GPU tests (kernels, pointwise, graph replay and greedy
# tracking), with SWEEP=1 the launch sweep of the SWA and conv prefill kernels, with AB=1 the decode
# switches' A/B (ab_decode.py), unless PROFILE=0 the prefill profile (8K chunk at context 8K, 32K
# prompt), and the check + prefill + decode tables of bench_gpu.py. Results under $OUT.
set -uo pipefail
source benchmarks/device_setup.sh
echo "== tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu_pointwise.py \
  tests/test_gpu_graph.py tests/test_gpu_capture_sizes.py tests/test_model_vision.py 2>&1 | tail -4
if [ "${SWEEP:-0}" = 1 ]; then
  echo "== sweep ($(left) s left)"
  timeout 200 python3 benchmarks/sweep_prefill_kernels.py --out "$OUT" 2>&1 | grep -E "^best|error" | tail -8
fi
if [ "${AB:-0}" = 1 ]; then
  echo "== decode A/B ($(left) s left)"
  timeout 150 python3 benchmarks/ab_decode.py --out "$OUT" 2>&1 | grep -E "^b[0-9]+ " | tail -16
fi
if [ "${PROFILE:-1}" = 1 ]; then
  echo "== profile ($(left) s left)"
  timeout 120 python3 benchmarks/profile_prefill.py --out "$OUT" 2>&1 | grep -E "^[a-z_0-9]+: wall|kernel span" | tail -8
fi
echo "== bench ($(left) s left)"
timeout $(( $(left) - 5 )) python3 benchmarks/bench_gpu.py --sections ${SECTIONS:-check,prefill,decode} --out "$OUT" --commit "$COMMIT" 2>&1 \
  | grep -E "^(prefill|decode|check|memory|video)" | tail -30
ls "$OUT"
