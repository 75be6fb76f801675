#!/usr/bin/env bash
# One device call: the gated norm folded into the GDN output projection (tune_gated_norm.py), the
# decode step at batch 1 with its entry merged into the table (ab_decode.py --switches extra, bare
# graph replays at 1K context, three rounds), then the fold tests. Results under $OUT.
#   COMMIT=<short sha> BUDGET=270 bash benchmarks/gpu_check_gated_norm.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 70 python3 benchmarks/tune_gated_norm.py --out "$OUT" 2>&1 | tee "$OUT/tune_gated_norm.log" | grep -E "M=1|Error" | tail -3
echo "seconds left: $(left)"
if [ -f "$OUT/gated_norm_entries.json" ]; then
  timeout $(( $(left) > 130 ? 110 : $(left) - 15 )) python3 benchmarks/ab_decode.py --out "$OUT" --switches extra \
    --batches 1 --extra-table "$OUT/gated_norm_entries.json" 2>&1 | grep -E "^b[0-9]|Error|error" | tail -4
  cp "$OUT/ab_decode.json" "$OUT/ab_decode_gated_norm_${COMMIT}.json" 2>/dev/null
fi
echo "seconds left: $(left)"
timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu_norm_gemm.py 2>&1 \
  | grep -E "passed|failed|Error|assert|FAILED" | tail -8 | tee "$OUT/tests_norm_gemm.txt"
