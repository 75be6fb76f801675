"""Latency of a short request that arrives while a long prompt is being prefilled.

Sends one /v1/completions request with a long text prompt (--long-words words, max_tokens 1), waits
--delay seconds, then sends a one-token chat request and reports how long that short request took,
next to the same short request on an idle server. Before the scheduler shared the step budget with
arrivals, the short request waited for the whole long prefill.

    infinitevl serve --port 8000 &
    python benchmarks/bench_arrival_behind_long_prompt.py --url http://127.0.0.1:8000 [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx


async def short_request(client: httpx.AsyncClient, url: str, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    t0 = time.perf_counter()
    r = await client.post(f"{url}/v1/chat/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - t0


async def run(url: str, long_words: int, delay: float) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        idle = min([await short_request(client, url, model) for _ in range(3)])
        body = {"model": model, "prompt": "hello " * long_words, "max_tokens": 1}
        t0 = time.perf_counter()
        long_task = asyncio.create_task(client.post(f"{url}/v1/completions", json=body))
        await asyncio.sleep(delay)
        behind = await short_request(client, url, model)
        long_resp = await long_task
        long_s = time.perf_counter() - t0
        long_resp.raise_for_status()
        prompt_tokens = long_resp.json()["usage"]["prompt_tokens"]
    return {
        "short_idle_s": idle,
        "short_behind_long_s": behind,
        "long_prompt_tokens": prompt_tokens,
        "long_request_s": long_s,
        "delay_s": delay,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--long-words", type=int, default=20_000)
    ap.add_argument("--delay", type=float, default=2.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    res = asyncio.run(run(args.url, args.long_words, args.delay))
    for k, v in res.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "arrival_behind_long_prompt.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
