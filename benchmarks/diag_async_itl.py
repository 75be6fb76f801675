# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""The open question of async scheduling under a burst of short answers (docs/benchmarks.md, CPU section):
64 requests of 512 prompt tokens and 16 output tokens each, with the simulated device of
bench_host_http.py, async scheduling off and on.

- `engine [EAGER_MS]`: in-process (LLM, no HTTP), the gaps between consecutive deltas of each request at
  the moment they leave the engine and the time from adding a request to its first delta, requests added
  four per step; EAGER_MS (default 0) is the simulated host time of an eager launch (bench_host_http.py's
  --eager-launch-ms: every step with prefill rows);
- `http`: the real server with the simulated device; per SSE event, the gap since the request's previous
  event and the number of events (a merged delta would show as fewer events than tokens).

    python benchmarks/diag_async_itl.py engine [EAGER_MS] | http
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

NUM, PROMPT, OUTPUT = 64, 512, 16


def _prompt(i: int) -> list[int]:
    return [1000 + (i * 7 + j) % 900 for j in range(PROMPT)]


def _gaps_ms(times: list[list[float]]) -> list[float]:
    return sorted(1e3 * (b - a) for ev in times for a, b in zip(ev, ev[1:], strict=False))


def engine() -> None:
    from bench_host_http import simulated_launch

    from model.tiny import default_tiny_checkpoint_dir
    from serving.llm import LLM
    from serving.types import SamplingParams

    for mode in (False, True):
        llm = LLM(str(default_tiny_checkpoint_dir()), device="cpu", dtype="float32", max_num_seqs=NUM,
                  max_num_batched_tokens=2048, async_scheduling=mode)  # fmt: skip
        eager_ms = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
        llm.core.runner.launch_forward = simulated_launch(1000, 2000, "/dev/null", eager_launch_ms=eager_ms)
        llm.core.runner.launch_is_host_bound = lambda batch: not batch.is_decode_only  # graphs for decode
        params = SamplingParams(max_tokens=OUTPUT, ignore_eos=True, temperature=0)
        reqs = [llm.make_request(_prompt(i), params) for i in range(NUM)]
        times: dict[str, list[float]] = {}
        added: dict[str, float] = {}
        pending, step = list(range(NUM)), 0
        while pending or llm.core.scheduler.has_work():
            while pending and pending[0] // 4 <= step:
                r = reqs[pending.pop(0)]
                llm.core.validate(r)
                added[r.request_id] = time.perf_counter()
                llm.core.add(
                    r, lambda d, rid=r.request_id: times.setdefault(rid, []).append(time.perf_counter())
                )
            llm.core.step()
            step += 1
        g = _gaps_ms(list(times.values()))
        ttft = sorted(1e3 * (times[rid][0] - t) for rid, t in added.items())
        done = sorted(1e3 * (times[rid][-1] - t) for rid, t in added.items())
        print(
            f"async {'on' if mode else 'off'}: gap p50 {g[len(g) // 2]:.1f} ms, p99 {g[int(0.99 * len(g))]:.1f}, "
            f"mean {statistics.mean(g):.1f} ms; first delta p50 {ttft[len(ttft) // 2]:.1f} ms, "
            f"mean {statistics.mean(ttft):.1f} ms; last delta p50 {done[len(done) // 2]:.1f} ms, "
            f"mean {statistics.mean(done):.1f} ms"
        )


async def _stream(client, url: str, i: int) -> tuple[int, list[float]]:
    body = {"model": "infinitevl", "prompt": _prompt(i), "max_tokens": OUTPUT, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    times = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                times.append(time.perf_counter())
    return len(times), times


def http() -> None:
    import httpx

    for mode, port in (("off", 8132), ("on", 8131)):
        flag = "--async-scheduling" if mode == "on" else "--no-async-scheduling"
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "bench_host_http.py"), "--serve", "/dev/null",
             f"--server-args={flag}", "--clients", str(NUM), "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)

            async def run() -> list[tuple[int, list[float]]]:
                async with httpx.AsyncClient(timeout=120) as c:
                    return await asyncio.gather(*(_stream(c, url, i) for i in range(NUM)))

            res = asyncio.run(run())
        finally:
            server.terminate()
            server.wait()
        g = _gaps_ms([t for _, t in res])
        events = sum(n for n, _ in res)
        print(f"async {mode}: {events} events for {NUM * OUTPUT} tokens, gap p50 {g[len(g) // 2]:.1f} ms")


if __name__ == "__main__":
    {"engine": engine, "http": http}[sys.argv[1] if len(sys.argv) > 1 else "engine"]()
