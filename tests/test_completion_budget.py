"""A request's token budget over HTTP (fake engine, one token per byte, max_model_len 40): a prompt that
leaves no room is the prompt's error, /v1/completions defaults to 16 tokens, and max_tokens 0 generates
nothing (OpenAI's scoring request)."""

from __future__ import annotations

import json

import httpx
import openapi_validator as oav
import pytest
from fake_engine import FakeEngine, FakeProcessor, ServerThread

from api.app import create_app
from api.responses import without_completion
from api.settings import ServerSettings
from serving.types import Delta, LogprobEntry, TokenLogprob, Usage

MODEL = "m"
MAX_MODEL_LEN = 40


@pytest.fixture(scope="module")
def http():
    settings = ServerSettings(
        served_model_name=MODEL, model_path="/ckpt", max_prompt_len=2000, max_model_len=MAX_MODEL_LEN
    )
    with (
        ServerThread(create_app(FakeEngine(), FakeProcessor(), settings)) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as client,
    ):
        yield client


def _error(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_a_prompt_without_room_is_the_prompt_error(http):
    """No room left in max_model_len, max_tokens sent or not: the prompt is named (messages, prompt,
    prompt.1 of a batch), code context_length_exceeded; a max_tokens that alone does not fit is named."""
    for extra, param, words in (
        ({"prompt": "x" * 41}, "prompt", "longer than max_model_len"),
        ({"prompt": "x" * 40}, "prompt", "leaves no room"),
        ({"prompt": "x" * 40, "max_tokens": 5}, "prompt", "leaves no room"),
        ({"prompt": ["a", "x" * 40]}, "prompt.1", "leaves no room"),
        ({"prompt": "a", "max_tokens": 40}, "max_tokens", "too large"),
    ):
        err = _error(http.post("/v1/completions", json={"model": MODEL, **extra}))
        assert (err["param"], err["code"]) == (param, "context_length_exceeded") and words in err["message"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 60}]}
    err = _error(http.post("/v1/chat/completions", json=chat))
    assert (err["param"], err["code"]) == ("messages", "context_length_exceeded"), err


def test_completions_default_to_16_tokens(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16
    clipped = http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 30})  # 10 tokens left
    assert clipped.json()["usage"]["completion_tokens"] == 10


def _sse(http: httpx.Client, body: dict) -> list[dict]:
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


@pytest.mark.parametrize("echo", [True, False])
def test_max_tokens_0_generates_nothing(http, echo: bool):
    """Nothing generated: the echo (or ""), finish_reason "length", no completion tokens; streamed the
    same; a prompt that fills max_model_len is accepted."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 0, "echo": echo, "n": 2}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    if oav.is_available():
        oav.validate(out, "CreateCompletionResponse")
    text = "Hello" if echo else ""
    assert [c["text"] for c in out["choices"]] == [text, text]
    assert {c["finish_reason"] for c in out["choices"]} == {"length"}
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}
    chunks = _sse(http, {**body, "stream_options": {"include_usage": True}})
    texts = {}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        assert choice["finish_reason"] == "length"
    assert texts == {0: text, 1: text} and chunks[-1]["usage"] == out["usage"]
    full = http.post("/v1/completions", json={**body, "prompt": "x" * MAX_MODEL_LEN})
    assert full.status_code == 200 and full.json()["usage"]["completion_tokens"] == 0, full.text


def test_max_tokens_0_limits(http):
    """min_tokens cannot exceed max_tokens 0; chat keeps its minimum of 1; below 0 is a schema error."""
    err = _error(
        http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 0, "min_tokens": 1})
    )
    assert (err["param"], err["code"]) == ("min_tokens", "invalid_value"), err
    err = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": -1}))
    assert err["param"] == "max_tokens" and "greater than or equal to 0" in err["message"], err
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 0}
    assert _error(http.post("/v1/chat/completions", json=chat))["param"] == "max_tokens"


def test_without_completion_keeps_the_prompt_part():
    """The one token the engine ran for a max_tokens 0 request is left out of every part of the delta;
    the prompt's logprobs stay."""
    t = TokenLogprob(7, "x", -0.5, [120])
    prompt = (LogprobEntry(t, ()),)
    final = Delta(
        "r", 0, "x", (7,), (LogprobEntry(t, (t,)),), "stop", "x", Usage(3, 1), prompt_logprobs=prompt
    )
    out = without_completion(final)
    assert (out.text, out.token_ids, out.logprobs, out.stop_reason) == ("", (), None, None)
    assert out.finish_reason == "length" and out.usage == Usage(3, 0) and out.prompt_logprobs == prompt
    assert (
        without_completion(Delta("r", 0, "", (), finish_reason="error", error="x")).finish_reason == "error"
    )
