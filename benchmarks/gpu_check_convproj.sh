#!/usr/bin/env bash
# One device call for the decode GEMM's two new epilogues: the GDN input projection with the short
# conv (`decode_gemm(conv=)`, the table op "linear_conv") and the output projections with the
# residual-add norm run by their last program (`decode_gemm(norm=)`, `norm_in_gemm_max_m`): the
# kernel, model and graph tests on the GPU, the whole-step A/B (`ab_decode.py --switches
# convproj,normgemm`, bare graph replays, three rounds) at BATCHES, then, with time left, the
# piecewise CUDA-graph test. Results under $OUT.
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=570 bash benchmarks/gpu_check_convproj.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
  -k "conv or decode_gemm or linear or split_k or norm" 2>&1 | tail -4
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_graph.py -k "epilogues or replay_equals" 2>&1 | tail -4
echo "seconds left: $(left)"
timeout $(( $(left) > 280 ? $(left) - 100 : $(left) - 10 )) python3 benchmarks/ab_decode.py --out "$OUT" \
  --switches "${SWITCHES:-convproj,normgemm}" --batches "${BATCHES:-1,64}" 2>&1 | grep -E "^b[0-9]|Error|error" | tail -20
cp "$OUT/ab_decode.json" "$OUT/ab_decode_convproj_normgemm_${COMMIT}.json" 2>/dev/null
echo "seconds left: $(left)"
if [ "$(left)" -gt 90 ]; then
  timeout $(( $(left) - 10 )) python3 -m pytest -q -p no:cacheprovider tests/test_gpu_graph.py -k piecewise 2>&1 | tail -4
fi
echo "seconds left: $(left)"
