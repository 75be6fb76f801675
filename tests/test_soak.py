"""Soak: thousands of random requests against one real server process (tiny checkpoint, CPU).

Random parameters (chat or legacy completions, stream or not, n 1-2, max_tokens 1-16, temperature, top_p,
stop strings, seeds, logprobs), random client disconnects mid-stream and client-side timeouts, at most
`CONCURRENCY` requests in flight against 8 slots. Every request that was not abandoned must complete with a
valid response (a sample is validated against OpenAI's schema); at the end no slot is held, the queues are
empty, the server is healthy, and its resident memory did not grow beyond a modest margin after warm-up.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openapi_validator as oav
import pytest

from tests.server_proc import require_cli, start_server

MODEL = "tiny"
NUM_REQUESTS = 2000
CONCURRENCY = 32
SLOTS = 8
VALIDATE_EVERY = 25  # validate one response in this many against OpenAI's schema
RSS_MARGIN_FRACTION = 0.25
RSS_MARGIN_BYTES = 100 * 2**20
WORDS = ["sea", "river", "stone", "light", "cloud", "night", "bird", "road", "tree", "fire", "glass"]
STOPS = ["\n", "a", "the", " e", "xyz", "。"]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status (VmRSS is in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


@dataclass
class Plan:
    """One random request and what the client will do with it."""

    path: str
    body: dict[str, Any]
    action: str  # "complete" | "disconnect" (close the stream after `after` events) | "timeout"
    after: int = 1


def random_plan(rng: random.Random, i: int) -> Plan:
    chat = rng.random() < 0.6
    stream = rng.random() < 0.5
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": rng.randint(1, 16),
        "n": rng.choice([1, 1, 1, 2]),
        "stream": stream,
    }
    if rng.random() < 0.5:
        body["temperature"] = rng.choice([0.0, 0.5, 1.0, 1.5])
    if rng.random() < 0.3:
        body["top_p"] = rng.choice([0.5, 0.9, 1.0])
    if rng.random() < 0.3:
        body["stop"] = rng.sample(STOPS, rng.randint(1, 3))
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(2**32)
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    text = " ".join(rng.choices(WORDS, k=rng.randint(1, 30))) + f" #{i}"
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.25:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 3)
    else:
        body["prompt"] = text
        if rng.random() < 0.25:
            body["logprobs"] = rng.randint(0, 3)
    roll = rng.random()
    action = "complete"
    if stream and roll < 0.12:
        action = "disconnect"
    elif not stream and roll < 0.06:
        action = "timeout"
    return Plan("/v1/chat/completions" if chat else "/v1/completions", body, action, rng.randint(1, 3))


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    samples: list[tuple[str, Any]] = field(default_factory=list)  # (schema name, object)


def _check_final(plan: Plan, body: dict[str, Any], tally: Tally) -> None:
    n = plan.body["n"]
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == list(range(n)), body
    for c in choices:
        assert c["finish_reason"] in ("stop", "length"), c
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= n * plan.body["max_tokens"], usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def _non_stream(client: httpx.AsyncClient, plan: Plan, i: int, tally: Tally) -> None:
    timeout = 0.01 if plan.action == "timeout" else 120.0
    try:
        r = await client.post(plan.path, json=plan.body, timeout=timeout)
    except httpx.TimeoutException:
        tally.outcomes["timed_out"] += 1
        return
    assert r.status_code == 200, r.text
    body = r.json()
    _check_final(plan, body, tally)
    if i % VALIDATE_EVERY == 0:
        chat = plan.path.endswith("chat/completions")
        tally.samples.append(("CreateChatCompletionResponse" if chat else "CreateCompletionResponse", body))
    tally.outcomes["completed"] += 1


async def _stream(client: httpx.AsyncClient, plan: Plan, i: int, tally: Tally) -> None:
    chat = plan.path.endswith("chat/completions")
    events: list[Any] = []
    async with client.stream("POST", plan.path, json=plan.body, timeout=120.0) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
            if plan.action == "disconnect" and len(events) >= plan.after:
                tally.outcomes["disconnected"] += 1
                return  # leaving the block closes the connection mid-stream
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = events[:-1]
    assert not any("error" in c for c in chunks), chunks
    reasons = Counter(c["index"] for e in chunks for c in e["choices"] if c.get("finish_reason"))
    assert reasons == Counter(range(plan.body["n"])), chunks
    if plan.body.get("stream_options", {}).get("include_usage"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    if i % VALIDATE_EVERY == 0 and chat:
        tally.samples.extend(("CreateChatCompletionStreamResponse", c) for c in chunks if c["choices"])
    elif i % VALIDATE_EVERY == 0:
        # OpenAI's spec reuses CreateCompletionResponse for legacy stream chunks without making
        # finish_reason and usage nullable, which its own streams send as null: validate the chunks that
        # finish a choice, without a null usage
        final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
        for c in final:
            tally.samples.append(("CreateCompletionResponse", {k: v for k, v in c.items() if v is not None}))
    tally.outcomes["completed"] += 1


async def _one(client: httpx.AsyncClient, plan: Plan, i: int, tally: Tally) -> None:
    try:
        if plan.body["stream"]:
            await _stream(client, plan, i, tally)
        else:
            await _non_stream(client, plan, i, tally)
    except Exception as e:  # noqa: BLE001 - every failure is reported together
        tally.failures.append(f"request {i} {plan.path} {json.dumps(plan.body)[:300]}: {e!r}")


async def run_load(base_url: str, plans: list[Plan], first: int, tally: Tally) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, limits=limits) as client:

        async def bounded(i: int, plan: Plan) -> None:
            async with gate:
                await _one(client, plan, i, tally)

        await asyncio.gather(*(bounded(first + k, p) for k, p in enumerate(plans)))


def gauges(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    out = {}
    for name in ("slots_used", "num_requests_running", "num_requests_waiting"):
        lines = [ln for ln in text.splitlines() if ln.startswith(f"infinitevl:{name}{{")]
        assert len(lines) == 1, lines
        out[name] = float(lines[0].rsplit(" ", 1)[1])
    return out


def settle(base_url: str) -> dict[str, float]:
    """Gauges after one more request: they are sampled on engine steps, so a final step brings them up to
    date after the last aborts. A few tries, since an abort may still be in flight."""
    body = {"model": MODEL, "prompt": "settle", "max_tokens": 1}
    for _ in range(10):
        assert httpx.post(base_url + "/v1/completions", json=body, timeout=60).status_code == 200
        now = gauges(base_url)
        if not any(now.values()):
            return now
        time.sleep(0.3)
    return now


@pytest.mark.slow
def test_soak(tiny_ckpt_dir) -> None:
    require_cli()
    rng = random.Random(20260704)
    plans = [random_plan(rng, i) for i in range(NUM_REQUESTS)]
    server = start_server(
        "--model", str(tiny_ckpt_dir), "--served-model-name", MODEL, "--max-num-seqs", str(SLOTS),
        "--max-waiting", "10000", "--log-level", "warning",
    )  # fmt: skip
    tally = Tally()
    try:
        third = NUM_REQUESTS // 3
        t0 = time.monotonic()
        asyncio.run(run_load(server.base_url, plans[:third], 0, tally))
        rss_warm = rss_bytes(server.proc.pid)
        asyncio.run(run_load(server.base_url, plans[third:], third, tally))
        seconds = time.monotonic() - t0
        final = settle(server.base_url)
        rss_end = rss_bytes(server.proc.pid)
        healthy = httpx.get(server.base_url + "/health", timeout=10).status_code
        print(
            f"\nsoak: {NUM_REQUESTS} requests in {seconds:.1f} s, {dict(tally.outcomes)}, "
            f"RSS after warm-up {rss_warm / 2**20:.0f} MiB, at the end {rss_end / 2**20:.0f} MiB"
        )
    finally:
        log = server.log()
        server.stop()
        server.log_path.unlink(missing_ok=True)
    assert not tally.failures, "\n".join(tally.failures[:10]) + f"\n({len(tally.failures)} failures)"
    assert sum(tally.outcomes.values()) == NUM_REQUESTS
    assert tally.outcomes["completed"] > NUM_REQUESTS * 0.8
    assert tally.outcomes["disconnected"] > 0 and tally.outcomes["timed_out"] > 0
    assert final == {"slots_used": 0.0, "num_requests_running": 0.0, "num_requests_waiting": 0.0}
    assert healthy == 200
    assert rss_end - rss_warm <= max(RSS_MARGIN_FRACTION * rss_warm, RSS_MARGIN_BYTES)
    assert "Traceback" not in log, log[-3000:]
    if oav.is_available():
        assert tally.samples
        for schema, obj in tally.samples:
            oav.validate(obj, schema)
