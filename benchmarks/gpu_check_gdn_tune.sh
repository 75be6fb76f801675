#!/usr/bin/env bash
# One device call after the one-launch GDN decode recurrence: the kernel tests it and the SWA split
# change touch, then whole-step candidates (ab_tables.py, three rounds, bare graph replays at 1K
# context): at batch 1 the fused kernel's launch, the recurrence unfused, and output projections /
# LM head configs with at most one program per SM and fewer K splits; at batch 64 the launch.
#   COMMIT=<short sha> BUDGET=570 bash benchmarks/gpu_check_gdn_tune.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
C=benchmarks/candidates
timeout 230 python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu_kernels.py tests/test_gpu_graph.py \
  tests/test_gpu_norm_gemm.py -k "gdn or swa or sliding or fused or graph or oracle" 2>&1 \
  | grep -E "passed|failed|Error|assert|FAILED" | tail -15 | tee "$OUT/tests.txt"
echo "seconds left: $(left)"
timeout $(( $(left) - 90 )) python3 benchmarks/ab_tables.py --out "$OUT/b1" --batches 1 \
  --candidates $C/b1_after_gdn_fused.json 2>&1 | grep -E "^b[0-9]|Error" | head -40
echo "seconds left: $(left)"
timeout $(( $(left) - 8 )) python3 benchmarks/ab_tables.py --out "$OUT/b64" --batches 64 \
  --candidates $C/b64_gdn_fused.json 2>&1 | grep -E "^b[0-9]|Error" | head -20
echo "seconds left: $(left)"
