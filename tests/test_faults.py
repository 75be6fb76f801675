"""Fault isolation on the real stack in-process (tiny checkpoint, CPU, uvicorn in a thread).

- a request that faults inside the engine gets a 500 in the envelope (or an error event when streaming)
  while the requests batched with it complete with exactly the tokens they produce alone (greedy);
- an engine thread that dies turns /health to 503 and makes new requests fail fast with 503;
- per-request deadlines: 504 before any token, the partial answer ("length") after some;
- refused requests are counted in `infinitevl:requests_rejected_total` by reason.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fake_engine import ServerThread

from api.app import create_app
from api.chat import request_timeout
from api.errors import APIError
from api.settings import ServerSettings
from serving.errors import EngineOverloaded

pytest.importorskip("serving.build")

MODEL = "tiny"
MARKER = "FAULTY-REQUEST"
CHAT = "/v1/chat/completions"
SLOTS = 4


@dataclass
class Stack:
    core: Any
    engine: Any
    app: Any
    metrics: Any
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.base_url


def _build(tiny_ckpt_dir, settings: ServerSettings) -> tuple[Any, Any, Any, Any]:
    from serving.build import build_engine
    from serving.config import EngineConfig
    from serving.engine import AsyncEngine
    from serving.metrics import Metrics

    stack = build_engine(
        EngineConfig(model=str(tiny_ckpt_dir), device="cpu", backend="torch", max_num_seqs=SLOTS)
    )
    metrics = Metrics(model_name=MODEL, backend="torch", state_dtype="float32", model_dtype="float32")
    stack.core.metrics = metrics
    engine = AsyncEngine(stack.core, info={"model": MODEL})
    engine.start()
    app = create_app(engine, stack.processor, settings, metrics=metrics)
    return stack, engine, app, metrics


def _settings(tiny_ckpt_dir, **kw: Any) -> ServerSettings:
    return ServerSettings(served_model_name=MODEL, model_path=str(tiny_ckpt_dir), **kw)


@pytest.fixture(scope="module")
def real(tiny_ckpt_dir) -> Iterator[Stack]:
    settings = _settings(tiny_ckpt_dir, max_request_body_bytes=2**20)
    stack, engine, app, metrics = _build(tiny_ckpt_dir, settings)
    tokenizer = stack.processor.tokenizer

    def fault_hook(er: Any) -> None:
        if MARKER in tokenizer.decode(er.req.prompt_token_ids):
            raise RuntimeError("injected fault")

    stack.core.fault_hook = fault_hook
    try:
        with ServerThread(app) as server:
            yield Stack(stack.core, engine, app, metrics, server)
    finally:
        engine.shutdown()


def chat_body(text: str, max_tokens: int = 8, **kw: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **kw,
    }


def answer(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + CHAT, json=body, headers=headers, timeout=120)


def stream_events(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[Any]:
    """The parsed `data:` events of a streamed chat (the string "[DONE]" for the terminator)."""
    events: list[Any] = []
    with httpx.stream("POST", url + CHAT, json={**body, "stream": True}, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def content_and_usage(r: httpx.Response) -> tuple[str, int]:
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]


def wait_idle(core: Any, timeout: float = 30.0) -> None:
    """Until the engine holds no request and every slot is free (the engine thread finishes last)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not core.requests and core.pool.num_free == core.pool.num_slots:
            core.check()
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {len(core.requests)} requests, {core.pool.num_free} free slots")


def assert_envelope(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["type"]
    return err


PROMPTS = ["The river flows", "Mountains at dawn", "A quiet library"]


def test_fault_fails_only_its_own_request(real: Stack) -> None:
    alone = [content_and_usage(answer(real.url, chat_body(p))) for p in PROMPTS]
    bodies = [chat_body(p) for p in PROMPTS] + [chat_body(f"{MARKER} please break")]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: answer(real.url, b), bodies))
    err = assert_envelope(responses[-1], 500)
    assert err["type"] == "server_error" and "RuntimeError" in err["message"]
    assert [content_and_usage(r) for r in responses[:-1]] == alone
    wait_idle(real.core)
    assert httpx.get(real.url + "/health", timeout=10).status_code == 200


def test_fault_in_a_stream_is_an_error_event(real: Stack) -> None:
    alone = content_and_usage(answer(real.url, chat_body(PROMPTS[0])))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(stream_events, real.url, chat_body(f"{MARKER} stream"))
        good = pool.submit(stream_events, real.url, chat_body(PROMPTS[0]))
        bad_events, good_events = bad.result(), good.result()
    errors = [e for e in bad_events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["type"] == "server_error"
    assert "[DONE]" not in bad_events and bad_events[-1] is errors[0]
    text = "".join(
        c["delta"].get("content") or "" for e in good_events if isinstance(e, dict) for c in e["choices"]
    )
    assert text == alone[0] and good_events[-1] == "[DONE]"
    wait_idle(real.core)


# ---- deadlines -----------------------------------------------------------------------------------------


def test_request_timeout_resolution(tiny_ckpt_dir) -> None:
    free, capped = _settings(tiny_ckpt_dir), _settings(tiny_ckpt_dir, request_timeout_s=5.0)
    assert request_timeout(None, None, free) is None
    assert request_timeout("2.5", None, free) == 2.5
    assert request_timeout(None, 3, free) == 3.0
    assert request_timeout("2.5", 1.5, free) == 1.5
    assert request_timeout(None, None, capped) == 5.0
    assert request_timeout("60", 30, capped) == 5.0  # a client cannot extend the server's limit
    assert request_timeout(" 0.5 ", None, capped) == 0.5
    for bad_header in ("", "abc", "0", "-1", "nan", "inf"):
        with pytest.raises(APIError) as info:
            request_timeout(bad_header, None, free)
        assert info.value.status_code == 400 and info.value.param == "X-Request-Timeout"
    for bad_body in (0, -2, True, "x", [1], float("nan")):
        with pytest.raises(APIError) as info:
            request_timeout(None, bad_body, free)
        assert info.value.param == "timeout"
    with pytest.raises(ValueError):
        _settings(tiny_ckpt_dir, request_timeout_s=0.0)


def _timeouts(real: Stack) -> float:
    value = real.metrics.registry.get_sample_value(
        "infinitevl:request_success_total", {"model_name": MODEL, "finished_reason": "timeout"}
    )
    return value or 0.0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("how", ["header", "body"])
def test_deadline_before_any_token_is_504(real: Stack, stream: bool, how: str) -> None:
    before = _timeouts(real)
    body = chat_body("too slow", stream=stream)
    headers = None
    if how == "header":
        headers = {"X-Request-Timeout": "0.000001"}
    else:
        body["timeout"] = 1e-6
    r = answer(real.url, body, headers)
    err = assert_envelope(r, 504)
    assert err["code"] == "request_timeout" and err["type"] == "timeout_error"
    wait_idle(real.core)
    assert _timeouts(real) == before + 1


@pytest.fixture
def slow_steps(real: Stack, monkeypatch: pytest.MonkeyPatch) -> float:
    """Each engine step takes at least 0.1 s more, so a 64-token answer needs over 6 s."""
    runner = real.core.runner
    launch_forward = runner.launch_forward

    def slow_launch(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.1)
        return launch_forward(*args, **kwargs)

    monkeypatch.setattr(runner, "launch_forward", slow_launch)
    return 0.1


def test_deadline_after_some_tokens_gives_partial_answer(real: Stack, slow_steps: float) -> None:
    r = answer(real.url, chat_body("long story", max_tokens=64), {"X-Request-Timeout": "1.0"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert 1 <= body["usage"]["completion_tokens"] < 64
    wait_idle(real.core)


def test_deadline_mid_stream_ends_with_length(real: Stack, slow_steps: float) -> None:
    events = stream_events(
        real.url,
        chat_body("long story", max_tokens=64, timeout=1.0, stream_options={"include_usage": True}),
    )
    assert events[-1] == "[DONE]"
    reasons = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c.get("finish_reason")]
    assert reasons == ["length"]
    usage = events[-2]["usage"]
    assert 1 <= usage["completion_tokens"] < 64
    wait_idle(real.core)


# ---- rejection metrics ---------------------------------------------------------------------------------


def _rejected(real: Stack, reason: str) -> float:
    value = real.metrics.registry.get_sample_value(
        "infinitevl:requests_rejected_total", {"model_name": MODEL, "reason": reason}
    )
    return value or 0.0


def test_rejections_are_counted_by_reason(real: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {reason: _rejected(real, reason) for reason in ("invalid", "overloaded", "draining")}
    bad_json = httpx.post(
        real.url + CHAT, content=b"{nope", headers={"content-type": "application/json"}, timeout=30
    )
    assert bad_json.status_code == 400
    too_big = httpx.post(real.url + CHAT, json=chat_body("x" * 2**20), timeout=60)
    assert too_big.status_code == 413
    assert answer(real.url, chat_body("x", max_tokens=0)).status_code == 400
    assert httpx.get(real.url + "/v1/models/nope", timeout=10).status_code == 404  # GET: not counted

    def overloaded(_: Any) -> Any:
        raise EngineOverloaded("full", retry_after=1.0)

    with monkeypatch.context() as m:
        m.setattr(real.engine, "generate", overloaded)
        assert answer(real.url, chat_body("x")).status_code == 429
    real.app.state.draining = True
    try:
        assert answer(real.url, chat_body("x")).status_code == 503
    finally:
        real.app.state.draining = False
    assert _rejected(real, "invalid") == counts["invalid"] + 3
    assert _rejected(real, "overloaded") == counts["overloaded"] + 1
    assert _rejected(real, "draining") == counts["draining"] + 1
    assert answer(real.url, chat_body("fine")).status_code == 200


# ---- a dead engine -------------------------------------------------------------------------------------


def test_dead_engine_answers_503(tiny_ckpt_dir) -> None:
    """An error outside the per-batch handling (the scheduler itself) kills the engine thread."""
    stack, engine, app, _ = _build(tiny_ckpt_dir, _settings(tiny_ckpt_dir))

    def broken_schedule() -> Any:
        raise RuntimeError("scheduler invariant broken")

    stack.core.scheduler.schedule = broken_schedule
    try:
        with ServerThread(app) as server:
            assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
            first = answer(server.base_url, chat_body("trigger"))
            assert_envelope(first, 503)
            health = httpx.get(server.base_url + "/health", timeout=10)
            assert health.status_code == 503 and health.json()["status"] == "dead"
            assert "scheduler invariant broken" in health.json()["detail"]
            for stream in (False, True):
                err = assert_envelope(answer(server.base_url, chat_body("again", stream=stream)), 503)
                assert err["code"] == "engine_dead"
    finally:
        engine.shutdown(timeout=2)
