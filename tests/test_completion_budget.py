"""A request's token budget over HTTP (fake engine, one token per byte, max_model_len 40): a prompt that
leaves no room is the prompt's error."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import FakeEngine, FakeProcessor, ServerThread

from api.app import create_app
from api.settings import ServerSettings

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
