#!/usr/bin/env bash
# One device call for the one-launch GDN decode recurrence (conv, gates, delta rule, gated norm;
# gdn.gdn_recur_decode): its kernel tests and the model-level graph tests, then the decode step with
# it on and off (ab_decode.py --switches gdnfused,gdnnorm: bare graph replays at 1K context, three
# rounds) at batches 1 and 64. Results under $OUT.
#   COMMIT=<short sha> BUDGET=570 bash benchmarks/gpu_check_gdn_fused.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 200 python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu_kernels.py tests/test_gpu_graph.py tests/test_gpu_norm_gemm.py \
  -k "gdn or graph or greedy or poison or oracle" 2>&1 \
  | grep -E "passed|failed|Error|assert|FAILED" | tail -15 | tee "$OUT/tests_gdn_fused.txt"
echo "seconds left: $(left)"
if [ "$(left)" -gt 80 ]; then
  timeout $(( $(left) - 8 )) python3 benchmarks/ab_decode.py --out "$OUT" --switches gdnfused,gdnnorm \
    --batches "${AB_BATCHES:-1,64}" 2>&1 | grep -E "^b[0-9]|Error|error" | tail -12
  cp "$OUT/ab_decode.json" "$OUT/ab_decode_gdn_fused_${COMMIT}.json" 2>/dev/null
fi
echo "seconds left: $(left)"
