#!/usr/bin/env bash
# One device call that times the batch-1 decode step three ways, to tell the target (1.3 of the
# floor) from run-to-run noise: (1) bare graph replays of the shipped step in 9 alternating rounds
# against two candidates (ab_tables.py), (2) the engine's path, `CudaGraphRunner.run_host` from host
# lists, one step at a time onto an idle GPU and 40 steps back to back, 5 rounds (ab_copy_in_graph.py),
# (3) the decode table of bench_gpu.py at batches 1, 8, 32 and 64. Results under $OUT.
#   COMMIT=<short sha> BUDGET=480 bash benchmarks/gpu_confirm_b1.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout $(( $(left) - 8 )) python3 benchmarks/ab_tables.py --out "$OUT/ab_b1" --batches 1 --rounds 9 \
  --contexts 1024 --candidates benchmarks/candidates/b1_confirm.json 2>&1 | grep -E "^b[0-9]|Error" | tee "$OUT/ab_b1.txt"
echo "seconds left: $(left)"
timeout $(( $(left) - 8 )) python3 benchmarks/ab_copy_in_graph.py --out "$OUT/run_host" --batches 1 --rounds 5 2>&1 \
  | grep -E "^b[0-9]|Error" | tee "$OUT/run_host.txt"
echo "seconds left: $(left)"
timeout $(( $(left) - 8 )) python3 benchmarks/bench_gpu.py --out "$OUT/bench" --commit "$COMMIT" --sections decode \
  --batches 1,8,32,64 > "$OUT/bench.log" 2>&1
grep -E "^\| [0-9]" "$OUT/bench.log" | head -8
echo "seconds left: $(left)"
