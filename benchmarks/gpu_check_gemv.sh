#!/usr/bin/env bash
# One device call: the folded-norm and GEMV tests, the batch-1 output projections and LM head on the
# CUDA-core GEMV path (tune_gemv.py), then the whole decode step at batch 1 with the folded norms of
# $FOLD_TABLE and the GEMV winners merged into the table (ab_decode.py --switches extra, bare graph
# replays at 1K context, three rounds), then the folded norms alone. Results under $OUT.
#   COMMIT=<short sha> FOLD_TABLE=benchmarks/results/gpu_h100_90a1119_norm_gemm_entries.json \
#     BUDGET=570 bash benchmarks/gpu_check_gemv.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu_norm_gemm.py tests/test_gpu_kernels.py \
  -k "norm or decode_gemm" 2>&1 | grep -E "passed|failed|Error|assert|FAILED" | tail -12 | tee "$OUT/tests_fold_gemv.txt"
echo "seconds left: $(left)"
timeout $(( $(left) > 400 ? $(left) - 260 : 150 )) python3 benchmarks/tune_gemv.py --out "$OUT" 2>&1 \
  | tee "$OUT/tune_gemv.log" | grep -E "M=1|Error" | grep -v "rel err" | tail -8
echo "seconds left: $(left)"
python3 - "$FOLD_TABLE" "$OUT/gemv_entries.json" > "$OUT/fold_gemv_table.json" <<'PY'
import json, sys
table = []
for path in sys.argv[1:]:
    try:
        table += json.load(open(path))["table"]
    except FileNotFoundError:
        pass
print(json.dumps({"table": table}))
PY
for tab in fold_gemv:"$OUT/fold_gemv_table.json" fold:"$FOLD_TABLE"; do
  name=${tab%%:*}; path=${tab#*:}
  if [ "$(left)" -gt 90 ]; then
    timeout $(( $(left) > 160 ? 150 : $(left) - 10 )) python3 benchmarks/ab_decode.py --out "$OUT" --switches extra \
      --batches "${AB_BATCHES:-1}" --extra-table "$path" 2>&1 | grep -E "^b[0-9]|Error|error" | tail -8
    cp "$OUT/ab_decode.json" "$OUT/ab_decode_${name}_${COMMIT}.json" 2>/dev/null
  fi
  echo "seconds left: $(left)"
done
