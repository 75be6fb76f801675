#!/usr/bin/env bash
# A short device call for a change to the CUDA-graph runner (none run yet): its GPU tests (graph replay = eager,
# padding confined to the dummy slot, the engine with and without async scheduling), the host parts
# of a runner step (diag_graph_overhead.py) and the decode table at batches BATCHES (results under $OUT).
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=300 bash benchmarks/gpu_check_runner.sh     (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_graph.py 2>&1 | tail -4
echo "seconds left: $(left)"
if [ "$(left)" -gt 120 ]; then
  timeout 80 python3 benchmarks/diag_graph_overhead.py --batches 1,64 --out "$OUT" 2>&1 \
    | grep -A10 '"host_parts"' | head -24
fi
echo "seconds left: $(left)"
timeout $(( $(left) - 5 )) python3 benchmarks/bench_gpu.py --out "$OUT" --commit "$COMMIT" --sections decode \
  --batches "${BATCHES:-1,64}" 2>&1 | grep -E "^\| [0-9]" | head -12
