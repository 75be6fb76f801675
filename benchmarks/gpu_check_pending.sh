#!/usr/bin/env bash
# A short device call for the changes that wait for a GPU: the GPU tests of the staging copy captured
# in the graphs (CudaGraphRunner copy_in_graph), of fla's forward called below its wrapper
# (fla_direct) and of the block norms folded into the GEMVs (norm_gemm); the A/B of copy_in_graph on
# decode steps (ab_copy_in_graph.py); the norm-folding tune (tune_norm_gemm.py) and the whole-step
# A/B of its entries (ab_decode.py --switches normgemm); with time left, the eager prefill and mixed
# steps with and without fla_direct (profile_eager.py). Results under $OUT.
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=560 bash benchmarks/gpu_check_pending.sh     (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_graph.py tests/test_gpu_kernels.py \
  -k "replay_equals or direct_fla or fla_forward or norm_gemm or norm_linear or norms_folded" 2>&1 | tail -4
echo "seconds left: $(left)"
timeout 110 python3 benchmarks/ab_copy_in_graph.py --out "$OUT" 2>&1 | grep -E "^b[0-9]"
echo "seconds left: $(left)"
if [ "$(left)" -gt 200 ]; then
  timeout 130 python3 benchmarks/tune_norm_gemm.py --out "$OUT" --batches 1,8 2>&1 | grep -E "^[a-z_]+ M="
  echo "seconds left: $(left)"
  [ -f "$OUT/norm_gemm_entries.json" ] && timeout $(( $(left) > 130 ? 110 : $(left) - 20 )) python3 benchmarks/ab_decode.py \
    --switches normgemm --norm-table "$OUT/norm_gemm_entries.json" --batches 1,8 --out "$OUT" 2>&1 | grep -E "^b[0-9]"
fi
echo "seconds left: $(left)"
if [ "$(left)" -gt 90 ]; then
  timeout $(( $(left) - 10 )) python3 benchmarks/profile_eager.py --out "$OUT" --cases "prefill 256,mixed 64 + 512" \
    > "$OUT/profile_eager.log" 2>&1
  grep -E "host enqueue" "$OUT/profile_eager.log"
fi
ls "$OUT"
