#!/usr/bin/env bash
# One device call for the GDN input projection with the decode short conv in its GEMM epilogue
# (`decode_gemm(conv=)`, the table op "linear_conv"): the kernel, model and graph tests on the GPU
# (with the piecewise CUDA-graph test), the whole-step A/B (`ab_decode.py --switches convproj`, bare
# graph replays, three rounds) at BATCHES, then, with time left, the host enqueue of eager steps with
# prefill rows against the piecewise graphs (profile_eager.py --piecewise). Results under $OUT.
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=570 bash benchmarks/gpu_check_convproj.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py -k "conv" 2>&1 | tail -3
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_graph.py \
  -k "conv_in_the_input or piecewise" 2>&1 | tail -3
echo "seconds left: $(left)"
timeout $(( $(left) > 300 ? 200 : $(left) - 10 )) python3 benchmarks/ab_decode.py --out "$OUT" \
  --switches "${SWITCHES:-convproj}" --batches "${BATCHES:-1,64}" 2>&1 | grep -E "^b[0-9]|Error|error" | tail -20
cp "$OUT/ab_decode.json" "$OUT/ab_decode_${SWITCHES:-convproj}_${COMMIT}.json" 2>/dev/null
echo "seconds left: $(left)"
if [ "$(left)" -gt 100 ]; then
  timeout $(( $(left) - 10 )) python3 benchmarks/profile_eager.py --out "$OUT" --piecewise \
    --cases "prefill 256,mixed 64 + 512" > "$OUT/profile_eager.log" 2>&1
  grep -E "host enqueue|piecewise graphs" "$OUT/profile_eager.log"
fi
echo "seconds left: $(left)"
