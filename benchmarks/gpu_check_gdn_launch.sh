#!/usr/bin/env bash
# One device call: the kernels of one batch-1 decode step (profile_decode.py, eager, every kernel
# listed), then the one-launch GDN recurrence's launch in the whole step at batches 1 and 8 and the
# recurrence unfused (ab_tables.py, three rounds, bare graph replays at 1K context).
#   COMMIT=<short sha> BUDGET=400 bash benchmarks/gpu_check_gdn_launch.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 150 python3 benchmarks/profile_decode.py --batches 1 --top 45 --out "$OUT" 2>&1 | tail -50
echo "seconds left: $(left)"
timeout $(( $(left) - 8 )) python3 benchmarks/ab_tables.py --out "$OUT/ab" --batches 1,8 \
  --candidates benchmarks/candidates/b1_b8_gdn_launch.json 2>&1 | grep -E "^b[0-9]|Error" | head -30
echo "seconds left: $(left)"
