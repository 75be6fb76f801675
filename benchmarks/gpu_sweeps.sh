#!/usr/bin/env bash
# One device call: where a decode step and a prefill chunk spend GPU time (fused pointwise ops on and
# off), the prefill kernel launch sweep and the decode GEMM sweep. Results under $OUT.
set -uo pipefail
source benchmarks/device_setup.sh
timeout 120 python3 benchmarks/profile_decode.py --batches 1,64,256 --ctx 1024 --prefill 8192 --out "$OUT" 2>&1 | tail -100
echo "== prefill kernel sweep ($(left) s left)"
timeout 150 python3 benchmarks/sweep_prefill_kernels.py --out "$OUT" 2>&1 | grep -E "best|Error|error" | tail -8
echo "== gemm sweep ($(left) s left)"
[ "$(left)" -gt 30 ] && timeout $(( $(left) - 5 )) python3 benchmarks/sweep_gemm.py --out "$OUT" 2>&1 | grep -E "^M=|Error" | tail -8
ls "$OUT"
