#!/usr/bin/env bash
# Device call: end-to-end HTTP at 64 and 256 clients on a real-shape random checkpoint (results under $OUT).
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 benchmarks/make_random_checkpoint.py --config benchmarks/configs/infinitevl-4b-config.json --out /tmp/ivl4b
python3 -m serving serve --model /tmp/ivl4b --device cuda --port 8000 --max-num-seqs 256 \
  --max-num-batched-tokens 8192 --log-level warning > "$OUT/server.log" 2>&1 &
for _ in $(seq 1 240); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
for c in 64 256; do
  timeout 120 python3 benchmarks/bench_http.py --url http://127.0.0.1:8000 --clients $c --requests $c \
    --prompt-len 512 --output-len 256 --out "$OUT/http_c$c.json" > /dev/null 2>&1
  python3 -c "import json; d=json.load(open('$OUT/http_c$c.json')); print($c, 'clients', round(d['output_tok_per_s']), 'tok/s', 'ttft', d['ttft_ms'], 'itl', d['itl_ms'], 'ok', d['ok'])"
done
