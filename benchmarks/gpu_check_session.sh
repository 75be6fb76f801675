#!/usr/bin/env bash
# One device call: every GPU test, then the decode candidates that are off by default, in the whole
# step against the shipped defaults (ab_tables.py with benchmarks/candidates/session_decode_changes.json:
# three rounds of bare graph replays at 1K context, batches 1, 8 and 64). Results under $OUT.
#   COMMIT=<short sha> BUDGET=570 bash benchmarks/gpu_check_session.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 330 python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu_*.py 2>&1 \
  | grep -E "passed|failed|Error|assert|FAILED" | tail -15 | tee "$OUT/tests_gpu.txt"
echo "seconds left: $(left)"
timeout $(( $(left) - 8 )) python3 benchmarks/ab_tables.py --out "$OUT/ab" --batches "${AB_BATCHES:-1,8,64}" \
  --candidates benchmarks/candidates/session_decode_changes.json 2>&1 | grep -E "^b[0-9]|Error" | head -30
echo "seconds left: $(left)"
