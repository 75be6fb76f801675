#!/usr/bin/env bash
# One device call: the whole GPU measurement campaign (results under $OUT).
#   1. real-shape random checkpoint   2. HTTP server end to end (1/16/64/256 clients)
#   3. with AB_ASYNC=1, HTTP at 1, 64 and 256 clients again with --async-scheduling (its A/B), then with
#      --disable-async-output (the output overlap's A/B); VARIANTS="name:flags ..." names other servers
#      ("base:" is the default one), SHORT=1 adds a burst of 64 16-token answers to each
#   BASE_CLIENTS="" skips step 2, TAIL_BUDGET=0 skips step 4; http_summary.txt has one line per run
#   4. decode and prefill step times (bench_gpu.py), if time remains
# Run on the device with the carried wheels in .whl/ (fastapi, uvicorn, sse-starlette, pydantic, av, fla).
set -uo pipefail
OUT=${OUT:-/tmp/out}
COMMIT=${COMMIT:-unknown}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
t0=$(date +%s)
[ -f /tmp/ivl4b/model.safetensors.index.json ] || \
  python3 benchmarks/make_random_checkpoint.py --config benchmarks/configs/infinitevl-4b-config.json --out /tmp/ivl4b
echo "checkpoint written in $(( $(date +%s) - t0 )) s"

summarize() {  # NAME: one line per HTTP run into $OUT/http_summary.txt (the device returns at most 8 files)
  python3 - "$OUT/http_$1.json" "$1" <<'PY' | tee -a "$OUT/http_summary.txt"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: ok {d['ok']}/{d['requests']} {d['output_tok_per_s']:.0f} tok/s  TTFT p50/p99 "
      f"{d['ttft_ms']['p50']:.1f}/{d['ttft_ms']['p99']:.1f} ms  ITL p50/p99 {d['itl_ms']['p50']:.2f}/{d['itl_ms']['p99']:.2f} ms")
PY
}

start_server() {  # PORT LOG [extra serve args]: start the server on the checkpoint, wait until healthy
  local port=$1 log=$2
  shift 2
  python3 -m serving serve --model /tmp/ivl4b --device cuda --port "$port" --max-num-seqs 256 \
    --max-num-batched-tokens 8192 --log-level warning "$@" > "$log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 240); do
    curl -sf "localhost:$port/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "server died"; tail -50 "$log"; exit 1; }
    sleep 1
  done
  echo "server ready after $(( $(date +%s) - t0 )) s"
}

if [ -n "${BASE_CLIENTS-1 16 64 256}" ]; then  # BASE_CLIENTS="" skips the plain table
  start_server 8000 "$OUT/server.log"
  for c in ${BASE_CLIENTS-1 16 64 256}; do
    n=$(( c < 4 ? 4 : c ))
    timeout 150 python3 benchmarks/bench_http.py --url http://127.0.0.1:8000 --clients $c --requests $n \
      --prompt-len 512 --output-len 256 --out "$OUT/http_c$c.json" 2>&1 | tail -1
    summarize "c$c"
  done
  curl -s localhost:8000/metrics | grep -E "^infinitevl:(slots|num_requests|generation_tokens_total|prompt_tokens_total)" > "$OUT/metrics_after.txt"
  kill -TERM $SERVER; wait $SERVER; echo "server exit code $?"
  grep -iE "state pool|slots" "$OUT/server.log" | head -5
fi

if [ "${AB_ASYNC:-0}" = 1 ]; then  # the same HTTP runs with async scheduling, then without the output overlap
  port=8001
  for variant in ${VARIANTS:-"sched:--async-scheduling" "sync:--disable-async-output"}; do
    name=${variant%%:*}
    # shellcheck disable=SC2086  # the flags split into words on purpose
    start_server $port "$OUT/server_$name.log" ${variant#*:}
    for c in 1 64 256; do
      n=$(( c < 4 ? 4 : c ))
      timeout 120 python3 benchmarks/bench_http.py --url http://127.0.0.1:$port --clients $c --requests $n \
        --prompt-len 512 --output-len 256 --out "$OUT/http_${name}_c$c.json" 2>&1 | tail -1
      summarize "${name}_c$c"
    done
    if [ "${SHORT:-0}" = 1 ]; then  # a burst of 64 short answers (most steps carry a prefill chunk)
      timeout 60 python3 benchmarks/bench_http.py --url http://127.0.0.1:$port --clients 64 --requests 64 \
        --prompt-len 512 --output-len 16 --out "$OUT/http_${name}_c64s16.json" 2>&1 | tail -1
      summarize "${name}_c64s16"
    fi
    kill -TERM $SERVER; wait $SERVER
    port=$(( port + 1 ))
  done
fi

left=$(( ${TAIL_BUDGET:-540} - ($(date +%s) - t0) ))
echo "seconds left for bench_gpu: $left"
if [ $left -gt 90 ]; then
  timeout $(( left - 20 )) python3 benchmarks/bench_gpu.py --sections decode,prefill --batches 1,64,256 \
    --out "$OUT" --commit "$COMMIT" 2>&1 | tail -40
fi
left=$(( ${TAIL_BUDGET:-570} - ($(date +%s) - t0) ))
if [ $left -gt 60 ]; then
  timeout $(( left - 10 )) python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_graph.py 2>&1 | tail -5
fi
# pack the per-run files into one archive so that everything comes back
(cd "$OUT" && tar czf http_runs.tgz http_*.json server*.log metrics_after.txt 2>/dev/null; \
  rm -f http_*.json server*.log metrics_after.txt)
ls -la "$OUT"
