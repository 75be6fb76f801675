#!/usr/bin/env bash
# A short device call (when little device time is left): the GPU kernel tests of the decode
# candidates (RoPE in the SWA split kernel, the SWA split merge in its tail, the one-launch GDN
# recurrence in the tiny model), then the batch-1 step: shipped defaults against RoPE in the SWA
# kernel, the embedding in the rope-table launch, the tail merge (at most 32 splits), and these
# together with another GDN launch (ab_tables.py, three rounds of bare graph replays at 1K context).
#   COMMIT=<short sha> BUDGET=170 bash benchmarks/gpu_check_session_short.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 80 python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu_kernels.py \
  -k "rotates or fused_gdn_step or many_splits or tail" 2>&1 | grep -E "passed|failed|Error|assert|FAILED" \
  | tail -8 | tee "$OUT/tests.txt"
echo "seconds left: $(left)"
timeout $(( $(left) - 5 )) python3 benchmarks/ab_tables.py --out "$OUT/ab" --batches 1 \
  --candidates benchmarks/candidates/session_decode_changes_short.json 2>&1 | grep -E "^b[0-9]|Error" \
  | tee "$OUT/ab.txt"
echo "seconds left: $(left)"
