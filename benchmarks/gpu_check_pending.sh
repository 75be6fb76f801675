#!/usr/bin/env bash
# A short device call for the changes that wait for a GPU: the graph test with the staging copy captured
# in the graphs (CudaGraphRunner copy_in_graph) and fla's forward called below its wrapper (fla_direct),
# then the A/B of copy_in_graph on decode steps (ab_copy_in_graph.py) and, with time left, the norm
# folded into the gate|up GEMV (exp_norm_gemv.py) and the eager prefill and mixed steps with and without
# fla_direct (profile_eager.py). Results under $OUT.
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=300 bash benchmarks/gpu_check_pending.sh     (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_graph.py tests/test_gpu_kernels.py \
  -k "replay_equals or direct_fla or fla_forward" 2>&1 | tail -3
echo "seconds left: $(left)"
timeout $(( $(left) > 160 ? 120 : $(left) - 10 )) python3 benchmarks/ab_copy_in_graph.py --out "$OUT" 2>&1 | grep -E "^b[0-9]"
echo "seconds left: $(left)"
if [ "$(left)" -gt 150 ]; then
  timeout 100 python3 benchmarks/exp_norm_gemv.py --out "$OUT" --batches 1,8 2>&1 | grep -E "^M="
fi
echo "seconds left: $(left)"
if [ "$(left)" -gt 90 ]; then
  timeout $(( $(left) - 10 )) python3 benchmarks/profile_eager.py --out "$OUT" --cases "prefill 256,mixed 64 + 512" \
    > "$OUT/profile_eager.log" 2>&1
  grep -E "host enqueue" "$OUT/profile_eager.log"
fi
ls "$OUT"
