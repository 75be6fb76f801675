#!/usr/bin/env bash
# One device call after RoPE moved into the SWA decode split kernel by default: the GPU tests that
# touch it (kernel, tiny model, graph replay, greedy tracking of the fp32 oracle), then the whole
# step against the old default (ab_tables.py, three rounds of bare graph replays): batch 1 at 1K and
# 8K context, then batch 64 at 1K while time is left. Results under $OUT.
#   COMMIT=<short sha> BUDGET=420 bash benchmarks/gpu_check_rope_default.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 210 python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu_kernels.py tests/test_gpu_graph.py \
  -k "rotates or fused_gdn_step or switches or greedy or replay or sliding" 2>&1 \
  | grep -E "passed|failed|Error|assert|FAILED" | tail -12 | tee "$OUT/tests.txt"
echo "seconds left: $(left)"
timeout $(( $(left) - 8 )) python3 benchmarks/ab_tables.py --out "$OUT/ab_b1" --batches 1 \
  --contexts 1024,8192 --candidates benchmarks/candidates/rope_default_off.json 2>&1 \
  | grep -E "^b[0-9]|Error" | tee "$OUT/ab_b1.txt"
echo "seconds left: $(left)"
timeout $(( $(left) - 8 )) python3 benchmarks/ab_tables.py --out "$OUT/ab_b64" --batches 64 \
  --candidates benchmarks/candidates/rope_default_off.json 2>&1 | grep -E "^b[0-9]|Error" | tee "$OUT/ab_b64.txt"
echo "seconds left: $(left)"
