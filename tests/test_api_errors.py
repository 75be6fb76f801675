"""Malformed requests: each gets a 4xx in OpenAI's error envelope (never FastAPI's 422, never a 500), and the
server stays healthy and correct afterwards."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import openapi_validator as oav
import pytest
from fake_engine import FakeEngine, FakeProcessor, ServerThread
from PIL import Image

from api.app import create_app
from api.media import MediaLimits
from api.settings import ServerSettings

MODEL = "m"
BODY_LIMIT = 64 * 1024


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


PNG = _png()


def img(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def server():
    engine, processor = FakeEngine(), FakeProcessor()
    settings = ServerSettings(
        served_model_name=MODEL,
        model_path="/ckpt",
        max_prompt_len=2000,
        max_model_len=4096,
        max_request_body_bytes=BODY_LIMIT,
        media=MediaLimits(max_images_per_request=2),
    )
    with ServerThread(create_app(engine, processor, settings)) as s:
        yield engine, s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[1].base_url, timeout=30) as c:
        yield c


def chat(**fields: Any) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def msgs(*messages: dict) -> dict:
    return {"model": MODEL, "messages": list(messages)}


# (id, json body or raw bytes, expected status, expected param or None)
CHAT_CASES: list[tuple[str, Any, int, str | None]] = [
    ("bad-json", b'{"model": "m", "messages": [', 400, None),
    ("json-array", b"[1, 2]", 400, None),
    ("empty-body", b"", 400, None),
    ("not-utf8", b"\xff\xfe{", 400, None),
    ("no-messages", {"model": MODEL}, 400, "messages"),
    ("no-model", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("empty-messages", msgs(), 400, "messages"),
    ("messages-string", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("unknown-role", msgs({"role": "robot", "content": "x"}), 400, "messages.0.role"),
    ("missing-role", msgs({"content": "x"}), 400, "messages.0.role"),
    ("content-number", msgs({"role": "user", "content": 5}), 400, "messages.0.content"),
    ("unknown-part", msgs({"role": "user", "content": [{"type": "hologram"}]}), 400, "messages.0.content.0"),
    (
        "text-part-no-text",
        msgs({"role": "user", "content": [{"type": "text"}]}),
        400,
        "messages.0.content.0.text",
    ),
    ("user-no-content", msgs({"role": "user"}), 400, "messages.0.content"),
    (
        "audio-part",
        msgs({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}),
        400,
        None,
    ),
    ("tool-role", msgs({"role": "tool", "content": "x", "tool_call_id": "a"}), 400, "messages.0.role"),
    (
        "continue-final-with-generation-prompt",
        msgs({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"})
        | {"continue_final_message": True},
        400,
        "continue_final_message",
    ),
    (
        "continue-final-after-user",
        msgs({"role": "user", "content": "a"})
        | {"continue_final_message": True, "add_generation_prompt": False},
        400,
        "continue_final_message",
    ),
    (
        "bad-base64",
        msgs({"role": "user", "content": [img("data:image/png;base64,@@@not base64@@@")]}),
        400,
        None,
    ),
    (
        "not-an-image",
        msgs(
            {"role": "user", "content": [img("data:image/png;base64," + base64.b64encode(b"hello").decode())]}
        ),
        400,
        None,
    ),
    ("too-many-images", msgs({"role": "user", "content": [img(PNG), img(PNG), img(PNG)]}), 400, "messages"),
    ("private-url", msgs({"role": "user", "content": [img("http://127.0.0.1:1/x.png")]}), None, None),
    ("file-url", msgs({"role": "user", "content": [img("file:///etc/passwd")]}), None, None),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("response-format", chat(response_format={"type": "json_object"}), 400, "response_format"),
    ("audio-out", chat(audio={"voice": "alloy", "format": "wav"}), 400, "audio"),
    ("modalities", chat(modalities=["text", "audio"]), 400, "modalities"),
    ("n-zero", chat(n=0), 400, "n"),
    ("n-huge", chat(n=1000), 400, "n"),
    ("max-tokens-negative", chat(max_tokens=-1), 400, "max_tokens"),
    ("max-tokens-huge", chat(max_tokens=10**12), 400, "max_tokens"),
    ("max-tokens-over-model-len", chat(max_tokens=5000), 400, "max_tokens"),
    ("max-completion-tokens-zero", chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("temperature-5", chat(temperature=5), 400, "temperature"),
    ("temperature-string", chat(temperature="hot"), 400, "temperature"),
    ("top-p-zero", chat(top_p=0), 400, "top_p"),
    ("presence-penalty", chat(presence_penalty=3), 400, "presence_penalty"),
    ("top-logprobs-without-logprobs", chat(top_logprobs=2), 400, "top_logprobs"),
    ("top-logprobs-21", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("stop-too-many", chat(stop=[str(i) for i in range(40)]), 400, "stop"),
    ("stop-number", chat(stop=5), 400, "stop"),
    ("seed-string", chat(seed="abc"), 400, "seed"),
    ("stream-string", chat(stream="yes please"), 400, "stream"),
    ("logit-bias-range", chat(logit_bias={"5": 500}), 400, "logit_bias.5"),
    ("logit-bias-key", chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("stop-token-out-of-vocab", chat(stop_token_ids=[10**6]), 400, "stop_token_ids"),
    ("logit-bias-out-of-vocab", chat(logit_bias={"5000": 1}), 400, "logit_bias"),
    ("stream-yes", chat(stream="yes"), 400, "stream"),
    ("stream-one", chat(stream=1), 400, "stream"),
    ("max-tokens-true", chat(max_tokens=True), 400, "max_tokens"),
    ("max-tokens-string", chat(max_tokens="5"), 400, "max_tokens"),
    ("n-string", chat(n="2"), 400, "n"),
    ("logprobs-string", chat(logprobs="true"), 400, "logprobs"),
    ("stream-options-without-stream", chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("stream-options-stream-false", chat(stream=False, stream_options={}), 400, "stream_options"),
    ("stream-options-stream-null", chat(stream=None, stream_options={}), 400, "stream_options"),
    ("min-tokens-over-max", chat(min_tokens=10, max_tokens=5), 400, "min_tokens"),
    ("prompt-too-long", msgs({"role": "user", "content": "x" * 2500}), 400, "messages"),
    ("unknown-model", chat(model="gpt-4o"), 404, "model"),
]


def _post(http: httpx.Client, path: str, body: Any, headers: dict | None = None) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"content-type": "application/json", **(headers or {})})
    return http.post(path, json=body, headers=headers)


def assert_envelope(r: httpx.Response, status: int | None) -> dict:
    if status is None:
        assert 400 <= r.status_code < 500, r.text
    else:
        assert r.status_code == status, r.text
    body = r.json()
    if oav.is_available():
        oav.validate(body, "ErrorResponse")
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(("case", "body", "status", "param"), CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_malformed_chat(http, case, body, status, param):
    err = assert_envelope(_post(http, "/v1/chat/completions", body), status)
    if param is not None:
        assert err["param"] == param, err
    if case == "unknown-model":
        assert err["code"] == "model_not_found"


def test_not_supported_message(http):
    err = assert_envelope(_post(http, "/v1/chat/completions", chat(tools=[{}])), 400)
    assert "not supported" in err["message"]


COMPLETION_CASES = [
    ("echo-logprobs-21", {"model": MODEL, "prompt": "a", "echo": True, "logprobs": 21}, 400, "logprobs"),
    ("suffix", {"model": MODEL, "prompt": "a", "suffix": "z"}, 400, "suffix"),
    ("no-prompt", {"model": MODEL}, 400, "prompt"),
    ("batch-with-empty-prompt", {"model": MODEL, "prompt": ["a", ""]}, 400, "prompt.1"),
    ("batch-with-empty-ids", {"model": MODEL, "prompt": [[1, 2], []]}, 400, "prompt.1"),
    ("batch-mixed", {"model": MODEL, "prompt": [[1, 2], "a"]}, 400, "prompt"),
    ("batch-negative-id", {"model": MODEL, "prompt": [[1, 2], [3, -4]]}, 400, "prompt.1"),
    ("batch-too-large", {"model": MODEL, "prompt": ["a"] * 257}, 400, "prompt"),
    ("empty-prompt", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("logprobs-bool-string", {"model": MODEL, "prompt": "a", "logprobs": "x"}, 400, "logprobs"),
    ("negative-token", {"model": MODEL, "prompt": [1, -2]}, 400, "prompt"),
    ("prompt-null", {"model": MODEL, "prompt": None}, 400, "prompt"),
    ("prompt-too-long", {"model": MODEL, "prompt": "x" * 2500}, 400, "prompt"),
    ("batch-prompt-too-long", {"model": MODEL, "prompt": ["a", "x" * 2500]}, 400, "prompt.1"),
    ("echo-string", {"model": MODEL, "prompt": "a", "echo": "yes"}, 400, "echo"),
    ("max-tokens-float", {"model": MODEL, "prompt": "a", "max_tokens": 2.0}, 400, "max_tokens"),
    (
        "stream-options-without-stream",
        {"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "param"), COMPLETION_CASES, ids=[c[0] for c in COMPLETION_CASES]
)
def test_malformed_completion(http, case, body, status, param):
    err = assert_envelope(_post(http, "/v1/completions", body), status)
    if param is not None:
        assert err["param"] == param or err["param"].startswith(param + "."), err
    if case.endswith("prompt-too-long"):
        assert err["param"] == param and "limit of 2000" in err["message"], err


def test_error_messages_and_codes(http):
    """A stop list over the limit reports the list's problem (not the string branch's "valid string" nor
    "1 more error"); input errors carry a code, as schema errors do."""
    for path, body, param, code, words in (
        ("/v1/completions", {"model": MODEL, "prompt": "a", "stop": ["s"] * 17}, "stop", "invalid_value",
         "at most 16 items"),
        ("/v1/chat/completions", chat(stop=["s"] * 17), "stop", "invalid_value", "at most 16 items"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt", "invalid_value", "must not be empty"),
        ("/v1/chat/completions", chat(top_logprobs=2), "top_logprobs", "invalid_value", "requires logprobs"),
        ("/v1/chat/completions", chat(logit_bias={"5000": 1}), "logit_bias", "invalid_value", "vocabulary"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a"] * 257}, "prompt", "request_too_large", "at most"),
        ("/v1/completions", {"model": MODEL, "prompt": "x" * 2500}, "prompt", "request_too_large", "limit"),
    ):  # fmt: skip
        err = assert_envelope(_post(http, path, body), 400)
        assert (err["param"], err["code"]) == (param, code) and words in err["message"], err
        assert "valid string" not in err["message"] and "more error" not in err["message"], err


def test_media_errors_carry_a_code(http):
    """A media URL that cannot be used is its value's error, an image over a media limit the request's
    size: both name the URL and carry a code, as every other input error does."""
    from media_helpers import png_declaring

    huge = "data:image/png;base64," + base64.b64encode(png_declaring(100_000, 100_000)).decode()
    for url, status, code in (
        ("data:image/png;base64,!!!", 400, "invalid_value"),
        ("data:image/png;base64,aGVsbG8=", 400, "invalid_value"),
        ("ftp://example.com/a.png", 400, "invalid_value"),
        (huge, 413, "request_too_large"),
    ):
        body = chat(messages=[{"role": "user", "content": [img(url), {"type": "text", "text": "?"}]}])
        err = assert_envelope(_post(http, "/v1/chat/completions", body), status)
        assert (err["param"], err["code"]) == ("messages.0.content.0.image_url.url", code), err


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusals_carry_a_code(server, http, path, stream):
    """A request the engine refuses at submission (n over its slots: RequestTooLarge; another invalid
    value: ValueError) is a 400 naming the field, with the code its handler gives it, as every other
    input error has: request_too_large for a limit, invalid_value otherwise."""
    from serving.errors import RequestTooLarge

    engine = server[0]
    body = chat() if path.endswith("chat/completions") else {"model": MODEL, "prompt": ["a", "b"]}
    body["stream"] = stream
    for exc, param, code in (
        (RequestTooLarge("n=3 exceeds the 2 slots of this server"), "n", "request_too_large"),
        (ValueError("max_tokens must be at least 1"), "max_tokens", "invalid_value"),
    ):

        def refuse(request, exc=exc):
            raise exc

        engine.generate = refuse
        try:
            err = assert_envelope(_post(http, path, body), 400)
        finally:
            del engine.generate
        assert (err["param"], err["code"]) == (param, code), err


def test_wrong_content_type(http):
    r = http.post("/v1/chat/completions", content=json.dumps(chat()), headers={"content-type": "text/plain"})
    assert_envelope(r, 415)


def test_oversized_body_content_length(http):
    big = chat(messages=[{"role": "user", "content": "x" * (BODY_LIMIT + 10)}])
    assert_envelope(_post(http, "/v1/chat/completions", big), 413)


def test_oversized_body_chunked(http):
    payload = json.dumps(chat(messages=[{"role": "user", "content": "y" * (BODY_LIMIT * 2)}])).encode()

    def chunks():
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_envelope(r, 413)


def test_wrong_method_and_route(http):
    assert_envelope(http.get("/v1/chat/completions"), 405)
    assert_envelope(http.post("/v1/nothing", json={}), 404)
    assert_envelope(http.get("/v1/models/other"), 404)


def test_tokenize_errors(http):
    assert_envelope(http.post("/tokenize", json={}), 400)
    assert_envelope(http.post("/tokenize", json={"prompt": "a", "messages": []}), 400)
    assert_envelope(http.post("/detokenize", json={"tokens": ["a"]}), 400)


def test_healthy_and_correct_after_errors(http, server):
    for _, body, _, _ in CHAT_CASES:
        _post(http, "/v1/chat/completions", body)
    assert http.get("/health").status_code == 200
    r = http.post(
        "/v1/chat/completions",
        json=chat(max_tokens=3, seed=5, messages=[{"role": "user", "content": [img(PNG)]}]),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    if oav.is_available():
        oav.validate(body, "CreateChatCompletionResponse")
    assert body["usage"]["completion_tokens"] == 3
    assert len(body["choices"][0]["message"]["content"].split()) == 3
    assert server[0].running == set()
