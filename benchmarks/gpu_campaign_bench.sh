#!/usr/bin/env bash
# One device call: the GPU tests of code new since the last GPU run (FIRST_TESTS, a pytest -k expression;
# none by default), then device ceilings, kernel checks and the decode / prefill / video / memory tables
# (bench_gpu.py, saved after each section), the host cost of eager forwards (profile_eager.py) and the
# launches that wait for the GPU (find_host_syncs.py), then the GPU tests with the time that is left, then
# the A/B of the newest decode switch (ab_decode.py) and the decode kernel profile if time still remains
# (results under $OUT).
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=570 bash benchmarks/gpu_campaign_bench.sh     (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
# first the GPU tests of what has never run on a GPU (FIRST_TESTS="" skips this)
if [ -n "${FIRST_TESTS-}" ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_graph.py tests/test_gpu_kernels.py \
    -k "$FIRST_TESTS" 2>&1 | tail -6
fi
timeout $(( $(left) - ${TEST_S:-120} )) python3 benchmarks/bench_gpu.py --out "$OUT" --commit "$COMMIT" \
  --sections "${SECTIONS:-device,check,decode,prefill,video,memory}" 2>&1 | grep -vE "^(decode|prefill) \{" | tail -80
echo "seconds left: $(left)"
if [ "$(left)" -gt 200 ]; then  # where the host time of eager steps goes; which launches wait for the GPU
  timeout 100 python3 benchmarks/profile_eager.py --out "$OUT" 2>&1 | grep -v Deprecat | head -90
  timeout 90 python3 benchmarks/find_host_syncs.py 2>&1 | grep -v Deprecat | tail -40
fi
echo "seconds left: $(left)"
if [ "$(left)" -gt 40 ]; then
  timeout $(( $(left) - 10 )) python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_gpu_graph.py \
    tests/test_gpu_kernels.py tests/test_gpu_pointwise.py} 2>&1 | tail -8
fi
echo "seconds left: $(left)"
if [ "$(left)" -gt 100 ]; then  # the newest decode switch against its off position, same process
  timeout $(( $(left) - 10 )) python3 benchmarks/ab_decode.py --switches "${AB_SWITCHES:-splitnorm}" \
    --batches 1,64,128 --out "$OUT" 2>&1 | tail -12
fi
echo "seconds left: $(left)"
if [ "$(left)" -gt 100 ]; then
  timeout $(( $(left) - 10 )) python3 benchmarks/profile_decode.py --batches 1,64 --out "$OUT" 2>&1 | tail -45
fi
ls -la "$OUT"
