#!/usr/bin/env bash
# One device call with the folded block norms in the shipped table (batch-1 bucket): every GPU test,
# then the decode step with and without them (ab_decode.py --switches fold, bare graph replays at 1K
# context, three rounds) at batches 1 and 8. Results under $OUT.
#   COMMIT=<short sha> BUDGET=570 bash benchmarks/gpu_check_fold_default.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 330 python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu_*.py 2>&1 \
  | grep -E "passed|failed|Error|assert|FAILED" | tail -15 | tee "$OUT/tests_gpu.txt"
echo "seconds left: $(left)"
if [ "$(left)" -gt 80 ]; then
  timeout $(( $(left) - 8 )) python3 benchmarks/ab_decode.py --out "$OUT" --switches fold \
    --batches "${AB_BATCHES:-1,8}" 2>&1 | grep -E "^b[0-9]|Error|error" | tail -8
  cp "$OUT/ab_decode.json" "$OUT/ab_decode_fold_${COMMIT}.json" 2>/dev/null
fi
echo "seconds left: $(left)"
