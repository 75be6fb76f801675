"""End-to-end HTTP benchmark: N concurrent streaming clients against a running server.

Each client sends /v1/completions requests with a prompt of --prompt-len random token ids, asks for
--output-len tokens with ignore_eos, and streams the answer (SSE). Reports output tokens/s, time to
first token (TTFT) and inter-token latency (ITL) p50/p99, and writes JSON.

    python -m serving serve --model DIR --device cuda &
    python benchmarks/bench_http.py --url http://127.0.0.1:8000 --clients 64 --requests 256
It runs on CPU against the tiny model as well (use small lengths there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive streamed chunks
    output_tokens: int = 0
    latency_s: float = 0.0
    error: str = ""


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (0 for an empty list)."""
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


async def one_request(
    client: httpx.AsyncClient, args: argparse.Namespace, prompt: list[int]
) -> RequestResult:
    body = {
        "model": args.model,
        "prompt": prompt,
        "max_tokens": args.output_len,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    last = None
    res = RequestResult(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"].get("completion_tokens", res.output_tokens)
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft_s = now - t0
                else:
                    res.itl_s.append(now - last)
                last = now
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = repr(e)
    res.latency_s = time.perf_counter() - t0
    return res


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(args.vocab_low, args.vocab_high) for _ in range(args.prompt_len)]
        for _ in range(args.requests)
    ]
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestResult] = []
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(
        base_url=args.url, timeout=args.timeout, limits=limits, headers=headers
    ) as client:
        if not args.model:  # the server's first served model
            args.model = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(client, args, queue.get_nowait()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
    good = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in good]
    itl = [x for r in good for x in r.itl_s]
    out_tokens = sum(r.output_tokens for r in good)
    return {
        "url": args.url,
        "clients": args.clients,
        "requests": args.requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "ok": len(good),
        "errors": [r.error for r in results if not r.ok][:5],
        "wall_s": wall,
        "output_tok_per_s": out_tokens / wall if wall > 0 else 0.0,
        "ttft_ms": {
            "p50": percentile(ttft, 50) * 1e3,
            "p99": percentile(ttft, 99) * 1e3,
            "mean": statistics.fmean(ttft) * 1e3 if ttft else 0.0,
        },
        "itl_ms": {"p50": percentile(itl, 50) * 1e3, "p99": percentile(itl, 99) * 1e3},
        "sample": asdict(good[0]) | {"itl_s": good[0].itl_s[:5]} if good else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="streaming HTTP load test (OpenAI /v1/completions)")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="", help="served model name (empty: server default)")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--vocab-low", type=int, default=1000, help="prompt ids are drawn from [low, high)")
    ap.add_argument("--vocab-high", type=int, default=2000)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="JSON file for the results")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
