#!/usr/bin/env bash
# One device call: the CUDA-graph tests (decode graphs, piecewise graphs with and without PDL), the
# deeper-pipeline sweep of the batch-1 decode GEMMs (sweep_decode_pipelines.py), the whole decode step
# at batch 1 with its winners merged into the table (ab_decode.py --switches extra, bare graph
# replays, three rounds), then, with time left, the step with the GDN input projection on the
# Triton GEMM instead of cuBLAS (PDL on both sides of it). Results under $OUT.
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=570 bash benchmarks/gpu_check_pipelines.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_graph.py 2>&1 | tail -4 | tee "$OUT/tests_graph.txt"
echo "seconds left: $(left)"
timeout $(( $(left) > 420 ? $(left) - 220 : 150 )) python3 benchmarks/sweep_decode_pipelines.py --out "$OUT" \
  --batches "${BATCHES:-1}" 2>&1 | tee "$OUT/sweep_decode_pipelines.log" | grep -E "M=[0-9]+:|Error" | grep -v "rel err"
echo "seconds left: $(left)"
if [ -f "$OUT/sweep_decode_pipelines.json" ] && [ "$(left)" -gt 120 ]; then
  timeout $(( $(left) > 230 ? 110 : $(left) - 10 )) python3 benchmarks/ab_decode.py --out "$OUT" --switches extra \
    --batches "${BATCHES:-1}" --extra-table "$OUT/sweep_decode_pipelines.json" 2>&1 | grep -E "^b[0-9]|Error|error" | tail -8
  cp "$OUT/ab_decode.json" "$OUT/ab_decode_pipelines_${COMMIT}.json" 2>/dev/null
fi
echo "seconds left: $(left)"
if [ "$(left)" -gt 100 ]; then
  python3 - <<'PY' > "$OUT/gdn_in_triton.json"
import json
e = [e for e in json.load(open("model/backends/decode_gemm_sm90.json"))["entries"] if e.get("name") == "gdn_in" and e["max_m"] == 1][0]
print(json.dumps({"table": [{"N": e["N"], "K": e["K"], "bias": False, "max_m": 1, "config": e["triton_config"]}]}))
PY
  timeout $(( $(left) - 10 )) python3 benchmarks/ab_decode.py --out "$OUT" --switches extra \
    --batches 1 --extra-table "$OUT/gdn_in_triton.json" 2>&1 | grep -E "^b[0-9]|Error|error" | tail -8
  cp "$OUT/ab_decode.json" "$OUT/ab_decode_gdn_in_triton_${COMMIT}.json" 2>/dev/null
fi
echo "seconds left: $(left)"
