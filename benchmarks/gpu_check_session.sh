#!/usr/bin/env bash
# One device call: every GPU test, then the decode candidates that are off by default, in the whole
# step against the shipped defaults (ab_tables.py with benchmarks/candidates/session_decode_changes.json,
# three rounds of bare graph replays): batch 1 at 1K and 8K context first, then batches 8 and 64 at
# 1K while time is left. Results under $OUT (tests_gpu.txt, ab_b1.txt, ab_b8_b64.txt, ab*/ab_tables.json).
#   COMMIT=<short sha> BUDGET=570 bash benchmarks/gpu_check_session.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
CANDS=benchmarks/candidates/session_decode_changes.json
timeout 330 python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu_*.py 2>&1 \
  | grep -E "passed|failed|Error|assert|FAILED" | tail -15 | tee "$OUT/tests_gpu.txt"
echo "seconds left: $(left)"
timeout $(( $(left) - 8 )) python3 benchmarks/ab_tables.py --out "$OUT/ab_b1" --batches 1 \
  --contexts 1024,8192 --candidates "$CANDS" 2>&1 | grep -E "^b[0-9]|Error" | tee "$OUT/ab_b1.txt"
echo "seconds left: $(left)"
timeout $(( $(left) - 8 )) python3 benchmarks/ab_tables.py --out "$OUT/ab_b8_b64" --batches 8,64 \
  --candidates "$CANDS" 2>&1 | grep -E "^b[0-9]|Error" | tee "$OUT/ab_b8_b64.txt"
echo "seconds left: $(left)"
