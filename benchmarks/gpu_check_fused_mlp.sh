#!/usr/bin/env bash
# One device call for the fused decode MLP (triton_kernels/mlp.py: gate|up, silu_mul and down in one
# persistent launch with a grid barrier): its GPU kernel tests (one launch, replays, the counters back
# at zero), the config sweep against the two products in a CUDA-graph chain of 8 layers
# (bench_fused_mlp.py), then the whole decode step with and without it at batches 1 and 8
# (ab_decode.py --switches mlp, bare graph replays, three rounds, the sweep's winners as table
# entries). Results under $OUT.
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=570 bash benchmarks/gpu_check_fused_mlp.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py -k "mlp" 2>&1 | tail -4 | tee "$OUT/tests.txt"
grep -q " passed" "$OUT/tests.txt" && ! grep -q "failed\|error" "$OUT/tests.txt" || { echo "tests failed: stop"; exit 1; }
echo "seconds left: $(left)"
timeout $(( $(left) > 400 ? $(left) - 230 : 120 )) python3 benchmarks/bench_fused_mlp.py --out "$OUT" \
  --batches "${BATCHES:-1,8}" --budget "${SWEEP_S:-110}" 2>&1 | tee "$OUT/bench_fused_mlp.log" | grep -E "base|BEST|recheck|Error|budget"
echo "seconds left: $(left)"
[ -f "$OUT/bench_fused_mlp.json" ] || { echo "no sweep result: stop"; exit 1; }
timeout $(( $(left) - 10 )) python3 benchmarks/ab_decode.py --out "$OUT" --switches mlp \
  --batches "${BATCHES:-1,8}" --mlp-table "$OUT/bench_fused_mlp.json" 2>&1 | grep -E "^b[0-9]|Error|error" | tail -20
cp "$OUT/ab_decode.json" "$OUT/ab_decode_mlp_${COMMIT}.json" 2>/dev/null
echo "seconds left: $(left)"
