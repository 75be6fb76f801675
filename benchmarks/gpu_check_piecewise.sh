#!/usr/bin/env bash
# One device call for the piecewise CUDA graphs (serving.piecewise_graph, on by default,
# `--no-piecewise-graphs` turns them off): the graph tests (piecewise replay = eager with padding
# confined, with and without PDL, and the decode graphs), the host enqueue and wall time of eager steps
# with prefill rows against the same steps through the piecewise graphs (profile_eager.py --piecewise,
# alternating rounds, with the fla_direct A/B and both cProfiles of the mixed step), then, with time
# left, HTTP at 1, 64 and 256 clients with and without them (gpu_campaign.sh's variants). Results
# under $OUT.
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=570 bash benchmarks/gpu_check_piecewise.sh    (.whl/ carried)
set -uo pipefail
source benchmarks/device_setup.sh
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_graph.py 2>&1 | tail -4
echo "seconds left: $(left)"
timeout $(( $(left) > 330 ? 200 : $(left) - 20 )) python3 benchmarks/profile_eager.py --out "$OUT" --piecewise \
  --cases "prefill 256,mixed 64 + 512,mixed 64 + 2048" > "$OUT/profile_eager.log" 2>&1
grep -E "host enqueue|piecewise graphs" "$OUT/profile_eager.log"
echo "seconds left: $(left)"
if [ "$(left)" -gt 250 ]; then
  BASE_CLIENTS="" AB_ASYNC=1 VARIANTS="pw: base:--no-piecewise-graphs" TAIL_BUDGET=0 \
    timeout $(( $(left) - 10 )) bash benchmarks/gpu_campaign.sh 2>&1 | grep -E "^(pw|base)_c|server ready|died"
fi
ls "$OUT"
