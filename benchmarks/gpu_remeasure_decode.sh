#!/usr/bin/env bash
# One device call: the decode table of bench_gpu.py (batches BATCHES, contexts 1K and 8K) RUNS times in
# turn with the staging copy issued by the host and captured in the graphs (--copy-in-graph), each run
# a fresh process; results as $OUT/bench_decode_{host,graph}_run{i}.json.
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=560 RUNS=2 bash benchmarks/gpu_remeasure_decode.sh   (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
for i in $(seq "${RUNS:-2}"); do
  for mode in host graph; do
    [ "$(left)" -lt 100 ] && break 2
    flag=""; [ "$mode" = graph ] && flag="--copy-in-graph"
    mkdir -p "$OUT/$mode$i"
    timeout $(( $(left) - 10 )) python3 benchmarks/bench_gpu.py --out "$OUT/$mode$i" --commit "$COMMIT" \
      --sections decode --batches "${BATCHES:-1,64,128,256}" $flag > "$OUT/$mode$i.log" 2>&1
    cp "$OUT/$mode$i/bench_gpu.json" "$OUT/bench_decode_${mode}_run$i.json" 2>/dev/null
    echo "run $i copy=$mode:"; grep -E "^\| [0-9]" "$OUT/$mode$i.log" | head -8
    echo "seconds left: $(left)"
  done
done
