#!/usr/bin/env bash
# One device call: the folded block norm (triton_kernels/norm_gemm.py, the norm's scale applied in
# the GEMV's epilogue): its GPU tests, the config sweep against the norm launch + product
# (tune_norm_gemm.py), then the whole decode step with the winners merged into the table
# (ab_decode.py --switches extra, bare graph replays at 1K context, three rounds), then the graph
# tests. Results under $OUT.
#   COMMIT=<short sha> BUDGET=570 bash benchmarks/gpu_check_norm_fold.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_norm_gemm.py 2>&1 | tail -6 | tee "$OUT/tests_norm_gemm.txt"
echo "seconds left: $(left)"
timeout $(( $(left) > 400 ? $(left) - 200 : 150 )) python3 benchmarks/tune_norm_gemm.py --out "$OUT" \
  --batches "${BATCHES:-1}" 2>&1 | tee "$OUT/tune_norm_gemm.log" | grep -E "M=[0-9]+:|Error" | grep -v "rel err" | tail -20
echo "seconds left: $(left)"
if [ -f "$OUT/norm_gemm_entries.json" ] && [ "$(left)" -gt 100 ]; then
  timeout $(( $(left) > 200 ? 150 : $(left) - 10 )) python3 benchmarks/ab_decode.py --out "$OUT" --switches extra \
    --batches "${AB_BATCHES:-1}" --extra-table "$OUT/norm_gemm_entries.json" 2>&1 | grep -E "^b[0-9]|Error|error" | tail -8
  cp "$OUT/ab_decode.json" "$OUT/ab_decode_norm_fold_${COMMIT}.json" 2>/dev/null
fi
echo "seconds left: $(left)"
if [ "$(left)" -gt 60 ]; then
  timeout $(( $(left) - 10 )) python3 -m pytest -q -p no:cacheprovider tests/test_gpu_graph.py -x 2>&1 | tail -4 | tee "$OUT/tests_graph.txt"
fi
echo "seconds left: $(left)"
