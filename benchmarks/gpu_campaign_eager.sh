#!/usr/bin/env bash
# One device call: the GPU tests of fla's forward called directly (TritonBackend.fla_direct), the host
# cost of eager steps (profile_eager.py: the steps that carry prefill chunks, the inter-token latency
# tails over HTTP; with the A/B of fla_direct), then the retune of the output projections at batch 64,
# each timed with the norm that consumes its product (tune_decode_gemm.py), the A/B of that table
# against the committed one (ab_decode.py), and the launches that wait for the GPU (find_host_syncs.py).
# Results and logs under $OUT; the tuned table as $OUT/decode_gemm_table.json.
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=560 bash benchmarks/gpu_campaign_eager.sh     (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
cp model/backends/decode_gemm_sm90.json "$OUT/old_table.json"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py -k "${FIRST_TESTS:-direct_fla or fla_forward}" 2>&1 | tail -3
timeout $(( $(left) > 280 ? 220 : $(left) - 40 )) python3 benchmarks/profile_eager.py --out "$OUT" ${EAGER_CASES:+--cases "$EAGER_CASES"} > "$OUT/profile_eager.log" 2>&1
grep -E "host enqueue" "$OUT/profile_eager.log"; grep -E "^ +[0-9]+ +[0-9.]+ +[0-9.]+ " "$OUT/profile_eager.log" | head -25
echo "seconds left: $(left)"
if [ "$(left)" -gt 300 ] && grep -q H100 "$OUT/device.txt"; then  # the table is tuned on the H100
  if [ -n "${TUNE_BUCKETS-64}" ]; then
    timeout 120 python3 benchmarks/tune_decode_gemm.py --out "$OUT" --ops linear --shapes mlp_down,gdn_out,swa_out \
      --buckets "${TUNE_BUCKETS-64}" --pdl on --partial-out on 2>&1 | grep -E "^[a-z_]+ M=" | tail -8
    timeout 120 python3 benchmarks/ab_decode.py --switches table --old-table "$OUT/old_table.json" \
      --batches "${AB_BATCHES:-1,64}" --out "$OUT" 2>&1 | tail -6
  fi
fi
echo "seconds left: $(left)"
if [ "$(left)" -gt 60 ]; then
  timeout $(( $(left) - 10 )) python3 benchmarks/find_host_syncs.py > "$OUT/find_host_syncs.log" 2>&1
  tail -c 3000 "$OUT/find_host_syncs.log"
fi
ls "$OUT"
