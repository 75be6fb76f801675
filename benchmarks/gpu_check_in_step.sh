#!/usr/bin/env bash
# One device call (prepared for the next session, not run yet): the batch-1 candidates of this
# session's tunes judged in the whole step (ab_tables.py: the shipped table against each candidate
# merged into it, three rounds), capped at one program per SM: the gated-norm fold's configs (its
# 4-split one keeps the gate|up fold's input at 4 partials) and the CUDA-core GEMV output projections.
#   COMMIT=<short sha> BUDGET=570 bash benchmarks/gpu_check_in_step.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
R=benchmarks/results
timeout $(( $(left) - 20 )) python3 benchmarks/ab_tables.py --out "$OUT" --batches 1 --max-programs 132 \
  --from-tune "$R/gpu_h100_79c6568_gated_norm_entries.json,$R/gpu_h100_5ce9af7_gemv_entries.json" 2>&1 \
  | tee "$OUT/ab_tables.log" | grep -E "^b[0-9]|Error" | head -40
echo "seconds left: $(left)"
