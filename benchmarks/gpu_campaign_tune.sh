#!/usr/bin/env bash
# One device call: the GPU tests of the newest kernels (FIRST_TESTS, a pytest -k expression over
# test_gpu_pointwise.py and test_gpu_kernels.py), a retune of the decode GEMM table's output projections with their split-K
# partials handed to the norm (tune_decode_gemm.py --partial-out on, PDL on; buckets TUNE_BUCKETS, "" for none; 64
# first), the A/B of the new table against the old one and of AB_SWITCHES (ab_decode.py), the host cost
# of a runner step (diag_graph_overhead.py) and the decode table with everything (bench_gpu.py).
# The tuned table comes back as $OUT/decode_gemm_table.json (results under $OUT).
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=570 bash benchmarks/gpu_campaign_tune.sh     (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
if [ -n "${FIRST_TESTS-}" ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_pointwise.py tests/test_gpu_kernels.py \
    -k "$FIRST_TESTS" 2>&1 | tail -6
fi
echo "seconds left: $(left)"
cp model/backends/decode_gemm_sm90.json "$OUT/old_table.json"
for b in ${TUNE_BUCKETS-64 1}; do
  if [ "$(left)" -gt 330 ]; then  # writes model/backends/decode_gemm_sm90.json here (and into $OUT)
    timeout $(( $(left) - 300 )) python3 benchmarks/tune_decode_gemm.py --out "$OUT" --ops linear \
      --shapes "${TUNE_SHAPES:-mlp_down,gdn_out,swa_out}" --buckets "$b" --pdl on --partial-out on 2>&1 \
      | grep -E "^[a-z_]+ M=" | tail -8
  fi
done
echo "seconds left: $(left)"
timeout $(( $(left) > 330 ? 170 : $(left) / 3 )) python3 benchmarks/ab_decode.py \
  --switches "${AB_SWITCHES:-table,mrope}" --old-table "$OUT/old_table.json" --batches "${AB_BATCHES:-1,64,128}" --out "$OUT" 2>&1 | tail -12
echo "seconds left: $(left)"
if [ "$(left)" -gt 150 ]; then
  timeout 70 python3 benchmarks/diag_graph_overhead.py --batches 1,64 --out "$OUT" 2>&1 \
    | grep -A12 '"host_parts"' | head -30
fi
echo "seconds left: $(left)"
timeout $(( $(left) - 5 )) python3 benchmarks/bench_gpu.py --out "$OUT" --commit "$COMMIT" --sections "${SECTIONS:-decode}" \
  --batches 1,64,128,256 2>&1 | grep -vE "^(decode|prefill) \{" | tail -30
ls -la "$OUT"
