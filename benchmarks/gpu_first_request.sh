#!/usr/bin/env bash
# Device check: start the server on a real-shape random checkpoint and time its first requests (TTFT).
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 benchmarks/make_random_checkpoint.py --config benchmarks/configs/infinitevl-4b-config.json --out /tmp/ivl4b
t0=$(date +%s)
python3 -m serving serve --model /tmp/ivl4b --device cuda --port 8000 --max-num-seqs 64 > "$OUT/server.log" 2>&1 &
for _ in $(seq 1 240); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
echo "ready after $(( $(date +%s) - t0 )) s"
for i in 1 2 3; do
  timeout 120 python3 benchmarks/bench_http.py --url http://127.0.0.1:8000 --clients 1 --requests 1 \
    --prompt-len 512 --output-len 32 --out "$OUT/first_$i.json" > /dev/null 2>&1
  python3 -c "import json; d=json.load(open('$OUT/first_$i.json')); print('request $i ttft_ms', round(d['ttft_ms']['p50']), 'itl_p50_ms', round(d['itl_ms']['p50'], 2), 'ok', d['ok'])"
done
grep -E "state pool|Error|Traceback" "$OUT/server.log" | head -5
