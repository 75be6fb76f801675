"""Hostile and malformed requests against one real server process (tiny checkpoint, CPU).

Every case must be answered without a 5xx, in OpenAI's error envelope (or as a valid success); afterwards the
server must be healthy, answer a normal greedy request exactly as it did before the abuse, and hold no slot
(`/metrics`). SSRF targets are refused before any connection: the only addresses submitted that the server
could connect to are loopback ports of this test, and a counting HTTP server on one of them proves that
nothing reached it. Redirect handling is checked on a second server started with
`--allow-private-media-networks` (loopback media allowed), whose redirect hops still get the scheme, domain
and count checks.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from media_helpers import png_declaring
from PIL import Image

from tests.server_proc import ServerProcess, require_cli, start_server

MODEL = "tiny"
BODY_LIMIT = 16 * 2**20  # --max-request-bytes of the server under test
MAX_PROMPT_LEN = 4096
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GOOD_MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
NORMAL = {"model": MODEL, "messages": GOOD_MESSAGES, "max_tokens": 6, "temperature": 0}


# ---- local HTTP servers (loopback only) ----------------------------------------------------------------


@dataclass
class LocalHTTP:
    """A counting HTTP server on 127.0.0.1; `routes` maps a path to (status, headers, body)."""

    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def start(self) -> LocalHTTP:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                owner.hits.append(self.path)
                status, headers, body = owner.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def redirect(location: str) -> tuple[int, dict[str, str], bytes]:
    return 302, {"Location": location}, b""


# ---- media payloads ------------------------------------------------------------------------------------


def png_bytes(size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 120 if mode == "L" else (200, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_chat(url: str, role: str = "user") -> dict[str, Any]:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": role, "content": parts}]}


def video_chat(url: str) -> dict[str, Any]:
    parts = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": GOOD_MESSAGES, "max_tokens": 2, **fields}


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


# ---- the cases -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile request: raw body (bytes/str) or JSON-able object, and the status it must get."""

    name: str
    body: Any
    status: int | tuple[int, ...]
    path: str = CHAT
    headers: tuple[tuple[str, str], ...] = ()
    raw: bool = False  # body is sent as given (bytes or str), not JSON-encoded
    param: str | None = None  # the error's param, where the case checks it

    def content(self) -> bytes:
        if self.raw:
            return self.body if isinstance(self.body, bytes) else self.body.encode("utf-8", "surrogatepass")
        return json.dumps(self.body).encode()  # ensure_ascii: lone surrogates travel as \\udXXX escapes


def raw(name: str, body: str | bytes, status: int | tuple[int, ...], **kw: Any) -> Case:
    return Case(name, body, status, raw=True, **kw)


OK_OR_400 = (200, 400)
SELF = "__SELF__"  # replaced by the server's own base URL
COUNTER = "__COUNTER__"  # replaced by the counting server's base URL

CASES: list[Case] = [
    # -- the body itself
    raw("bad-json", '{"model": "tiny", "messages": [', 400),
    raw("trailing-garbage", json.dumps(NORMAL) + "}}", 400),
    raw("body-is-array", "[1, 2, 3]", 400),
    raw("body-is-string", '"hello"', 400),
    raw("body-is-null", "null", 400),
    raw("empty-body", b"", 400),
    raw("whitespace-body", b"   \n\t ", 400),
    raw("invalid-utf8", b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe\xc0"}]}', 400),
    raw("deeply-nested-array", "[" * 10_000 + "]" * 10_000, 400),
    raw("deeply-nested-object", '{"model": "tiny", "metadata": ' + nested(10_000) + "}", 400),
    raw("nested-900-in-ignored-field", json.dumps(NORMAL)[:-1] + ', "extra": ' + nested(900) + "}", 200),
    raw("text-plain-content-type", json.dumps(NORMAL), 415, headers=(("content-type", "text/plain"),)),
    raw("nan-temperature", json.dumps(NORMAL)[:-1] + ', "temperature": NaN}', 400),
    raw("infinity-top-p", json.dumps(NORMAL)[:-1] + ', "top_p": Infinity}', 400),
    raw("minus-infinity-penalty", json.dumps(NORMAL)[:-1] + ', "presence_penalty": -Infinity}', 400),
    raw("nan-max-tokens", json.dumps(NORMAL)[:-1] + ', "max_tokens": NaN}', 400),
    raw(
        "duplicate-keys-last-wins",
        '{"model": "nope", "model": "tiny", "max_tokens": 2, "messages": ' + json.dumps(GOOD_MESSAGES) + "}",
        200,
    ),
    raw(
        "lone-surrogate-content",
        '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800 x"}]}',
        400,
    ),
    raw("lone-surrogate-model", '{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}', 400),
    raw("lone-surrogate-stop", json.dumps(NORMAL)[:-1] + ', "stop": "\\udfff"}', 400),
    raw("lone-surrogate-tokenize", '{"prompt": "\\ud800"}', 400, path="/tokenize"),
    # -- wrong types and values
    Case("messages-not-list", chat(messages="hello"), 400),
    Case("messages-empty", chat(messages=[]), 400),
    Case("messages-null", chat(messages=None), 400),
    Case("model-null", {**chat(), "model": None}, 400),
    Case("model-missing", {"messages": GOOD_MESSAGES}, 400),
    Case("unknown-model", chat(model="gpt-4o"), 404),
    Case("message-without-role", chat(messages=[{"content": "x"}]), 400),
    Case("unknown-role", chat(messages=[{"role": "wizard", "content": "x"}]), 400),
    Case("tool-role", chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), 400),
    Case("content-is-int", chat(messages=[{"role": "user", "content": 42}]), 400),
    Case("user-content-null", chat(messages=[{"role": "user", "content": None}]), 400),
    Case("unknown-part-type", chat(messages=[{"role": "user", "content": [{"type": "hologram"}]}]), 400),
    Case("audio-part", chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), 400),
    Case(
        "continue-final-message-after-user",
        chat(continue_final_message=True, add_generation_prompt=False),
        400,
        param="continue_final_message",
    ),
    Case("continue-final-message-not-a-bool", chat(continue_final_message="yes"), 400),
    Case("max-tokens-string", chat(max_tokens="ten"), 400),
    Case("max-tokens-negative", chat(max_tokens=-1), 400),
    Case("max-tokens-zero", chat(max_tokens=0), 400),
    Case("max-tokens-huge", chat(max_tokens=10**30), 400),
    Case("max-tokens-over-limit", chat(max_tokens=65), 400, param="max_tokens"),
    Case("max-tokens-true", chat(max_tokens=True), 400, param="max_tokens"),
    Case("max-tokens-float", chat(max_tokens=2.0), 400, param="max_tokens"),
    Case("temperature-string", chat(temperature="hot"), 400),
    Case("n-zero", chat(n=0), 400),
    Case("n-huge", chat(n=10_000), 400),
    Case("n-over-slots", chat(n=5), 400, param="n"),  # --max-num-seqs 4
    Case("n-string", chat(n="2"), 400, param="n"),
    Case("stream-yes", chat(stream="yes"), 400, param="stream"),
    Case(
        "stream-options-without-stream",
        chat(stream_options={"include_usage": True}),
        400,
        param="stream_options",
    ),
    Case("stop-int", chat(stop=7), 400),
    Case("stop-too-many", chat(stop=[f"s{i}" for i in range(100)]), 400),
    Case("logit-bias-bad-key", chat(logit_bias={"abc": 1}), 400),
    Case("logit-bias-out-of-vocab", chat(logit_bias={"99999999": 1}), 400, param="logit_bias"),
    Case("logit-bias-too-big", chat(logit_bias={"5": 1000}), 400),
    Case("stop-token-out-of-vocab", chat(stop_token_ids=[99999999]), 400, param="stop_token_ids"),
    Case("top-k-beyond-vocab", chat(top_k=10**18), 200),
    Case("seed-out-of-range", chat(seed=2**70), 400),
    Case("seed-extremes", chat(seed=-(2**63)), 200),
    Case("min-tokens-above-max", chat(min_tokens=5), 400),
    Case("top-logprobs-without-logprobs", chat(top_logprobs=3), 400),
    Case("top-logprobs-too-many", chat(logprobs=True, top_logprobs=50), 400),
    Case("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400),
    Case("response-format-json-schema", chat(response_format={"type": "json_schema"}), 400),
    Case("audio-output", chat(modalities=["text", "audio"]), 400),
    Case(
        "nulls-everywhere",
        {
            **chat(),
            **dict.fromkeys(
                [
                    "temperature",
                    "top_p",
                    "stop",
                    "seed",
                    "presence_penalty",
                    "frequency_penalty",
                    "logit_bias",
                    "user",
                    "top_k",
                    "min_p",
                    "repetition_penalty",
                    "stop_token_ids",
                    "stream_options",
                    "tools",
                    "tool_choice",
                    "response_format",
                    "metadata",
                    "max_completion_tokens",
                    "top_logprobs",
                ]
            ),
        },
        200,
    ),
    Case("nullable-fields-null", chat(stream=None, n=None, logprobs=None), 200),
    Case("unknown-fields-ignored", chat(foo={"bar": [1, 2]}, frobnicate=True), 200),
    Case(
        "unicode-everywhere",
        chat(
            messages=[{"role": "user", "content": "héllo 中文 😀 \u202e\u0000 end", "name": "名前"}],
            stop=["☃", "😀", "\u200b"],
            user="ユーザー",
            metadata={"ключ": "значение"},
        ),
        200,
    ),
    Case("unicode-model-name", chat(model="модель-😀"), 404),
    Case("stream-with-bad-params", chat(stream=True, temperature=-1), 400),
    Case("stream-options-wrong-type", chat(stream=True, stream_options="yes"), 400),
    Case("timeout-header-garbage", chat(), 400, headers=(("x-request-timeout", "soon"),)),
    Case("timeout-header-negative", chat(), 400, headers=(("x-request-timeout", "-3"),)),
    Case("timeout-header-nan", chat(), 400, headers=(("x-request-timeout", "nan"),)),
    Case("timeout-body-bool", chat(timeout=True), 400),
    Case("timeout-body-inf", chat(timeout="inf"), 400),
    # -- legacy completions and tokenizer routes
    Case(
        "prompt-ids-out-of-vocab",
        {"model": MODEL, "prompt": [1, 2, 999_999], "max_tokens": 2},
        400,
        path=COMPLETIONS,
    ),
    Case("prompt-ids-negative", {"model": MODEL, "prompt": [1, -2], "max_tokens": 2}, 400, path=COMPLETIONS),
    Case("prompt-mixed-list", {"model": MODEL, "prompt": [1, "a"], "max_tokens": 2}, 400, path=COMPLETIONS),
    Case("prompt-empty", {"model": MODEL, "prompt": "", "max_tokens": 2}, 400, path=COMPLETIONS),
    Case(
        "prompt-null",
        {"model": MODEL, "prompt": None, "max_tokens": 2},
        400,
        path=COMPLETIONS,
        param="prompt",
    ),
    Case(
        "completion-nullable-fields-null",
        {"model": MODEL, "prompt": "hi", "max_tokens": 2, "echo": None, "n": None, "stream": None},
        200,
        path=COMPLETIONS,
    ),
    Case(
        "prompt-batch-empty-item",
        {"model": MODEL, "prompt": ["a", ""], "max_tokens": 2},
        400,
        path=COMPLETIONS,
    ),
    Case(
        "prompt-batch-ids-out-of-vocab",
        {"model": MODEL, "prompt": [[1, 2], [999_999]], "max_tokens": 2},
        400,
        path=COMPLETIONS,
    ),
    Case("tokenize-both", {"prompt": "a", "messages": GOOD_MESSAGES}, 400, path="/tokenize"),
    Case("detokenize-out-of-vocab", {"tokens": [999_999_999]}, 400, path="/detokenize"),
    Case("detokenize-negative", {"tokens": [-1]}, 400, path="/detokenize"),
    # -- media: encoding and decoding
    Case("bad-base64", image_chat("data:image/png;base64,!!!not base64!!!"), 400),
    Case("data-url-without-comma", image_chat("data:image/png;base64"), 400),
    Case("not-an-image", image_chat(data_url(b"hello, I am text", "text/plain")), 400),
    Case("truncated-png", image_chat(data_url(png_bytes((64, 64))[:60])), 400),
    Case("truncated-jpeg", image_chat(data_url(jpeg_bytes()[:300], "image/jpeg")), 400),
    Case("png-bomb-header", image_chat(data_url(png_declaring(100_000, 100_000))), 413),
    Case("png-huge-real", image_chat(data_url(png_bytes((4000, 4000), "L"))), 413),
    Case("png-one-pixel", image_chat(data_url(png_bytes((1, 1)))), OK_OR_400),
    Case("png-extreme-aspect", image_chat(data_url(png_bytes((2, 1000)))), OK_OR_400),
    Case(
        "image-in-assistant",
        {
            **image_chat(data_url(png_bytes())),
            "messages": [
                {
                    "role": "assistant",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}],
                },
                {"role": "user", "content": "x"},
            ],
        },
        400,
    ),
    Case(
        "too-many-images",
        {
            **image_chat(""),
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes((8, 8)))}}]
                    * 17,
                }
            ],
        },
        400,
    ),
    Case("garbage-video", video_chat(data_url(b"\x00\x00\x00\x18ftypmp42garbage" * 10, "video/mp4")), 400),
    # -- media: SSRF, all refused before connecting
    Case("ssrf-self", image_chat(SELF + "/health"), 400),
    Case("ssrf-counter-loopback", image_chat(COUNTER + "/img.png"), 400),
    Case("ssrf-redirector-on-loopback", image_chat(COUNTER + "/to-self"), 400),
    Case("ssrf-localhost-name", image_chat("http://localhost:1/x.png"), 400),
    Case("ssrf-metadata", image_chat("http://169.254.169.254/latest/meta-data/"), 400),
    Case("ssrf-ipv6-loopback", image_chat("http://[::1]/x.png"), 400),
    Case("ssrf-private-10", image_chat("http://10.0.0.1/x.png"), 400),
    Case("ssrf-decimal-loopback", image_chat("http://2130706433/x.png"), 400),
    Case("ssrf-mapped-ipv6", image_chat("http://[::ffff:127.0.0.1]/x.png"), 400),
    Case("ssrf-unspecified", image_chat("http://0.0.0.0/x.png"), 400),
    Case("ssrf-credentials", image_chat("http://user:pw@127.0.0.1/x.png"), 400),
    Case("scheme-ftp", image_chat("ftp://127.0.0.1/x.png"), 400),
    Case("scheme-gopher", image_chat("gopher://127.0.0.1:70/_x"), 400),
    Case("local-file", image_chat("file:///etc/passwd"), 400),
    Case("local-absolute-path", image_chat("/etc/passwd"), 400),
    Case("video-ssrf-metadata", video_chat("http://169.254.169.254/v.mp4"), 400),
]


# ---- fixtures ------------------------------------------------------------------------------------------


@dataclass
class Target:
    server: ServerProcess
    counter: LocalHTTP
    baseline: dict[str, Any]  # the normal greedy answer before any hostile request


def post(base_url: str, path: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    hdrs = {"content-type": "application/json", **(headers or {})}
    return httpx.post(base_url + path, content=content, headers=hdrs, timeout=120)


def normal_answer(base_url: str) -> dict[str, Any]:
    r = httpx.post(base_url + CHAT, json=NORMAL, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    return {
        "content": choice["message"]["content"],
        "finish_reason": choice["finish_reason"],
        "usage": body["usage"],
    }


@pytest.fixture(scope="module")
def target(tiny_ckpt_dir) -> Iterator[Target]:
    require_cli()
    counter = LocalHTTP(routes={"/img.png": (200, {"Content-Type": "image/png"}, png_bytes())}).start()
    server = start_server(
        "--model",
        str(tiny_ckpt_dir),
        "--served-model-name",
        MODEL,
        "--max-num-seqs",
        "4",
        "--max-prompt-len",
        str(MAX_PROMPT_LEN),
        "--max-request-bytes",
        str(BODY_LIMIT),
        "--max-tokens-limit",
        "64",
        "--log-level",
        "warning",
    )
    counter.routes["/to-self"] = redirect(server.base_url + "/health")
    try:
        yield Target(server, counter, normal_answer(server.base_url))
    finally:
        server.stop()
        counter.stop()
        server.log_path.unlink(missing_ok=True)


def assert_envelope(r: httpx.Response) -> None:
    """OpenAI's ErrorResponse: {"error": {"message": str, "type": str, "param": ..., "code": ...}}."""
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert "param" in err and "code" in err, err


def assert_success(path: str, r: httpx.Response) -> None:
    body = r.json()
    if path == CHAT:
        assert body["object"] == "chat.completion" and body["choices"], body
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert isinstance(body["choices"][0]["message"]["content"], str)


def _resolve(case: Case, target: Target) -> bytes:
    content = case.content()
    content = content.replace(SELF.encode(), target.server.base_url.encode())
    return content.replace(COUNTER.encode(), f"http://127.0.0.1:{target.counter.port}".encode())


# ---- tests ---------------------------------------------------------------------------------------------


def test_case_names_unique_and_enough() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request(case: Case, target: Target) -> None:
    r = post(target.server.base_url, case.path, _resolve(case, target), dict(case.headers))
    expected = case.status if isinstance(case.status, tuple) else (case.status,)
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    assert r.status_code in expected, f"{r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        assert_envelope(r)
        if case.param is not None:
            assert r.json()["error"]["param"] == case.param, r.text[:500]
    else:
        assert_success(case.path, r)


def test_oversized_body_with_content_length(target: Target) -> None:
    body = json.dumps(chat(messages=[{"role": "user", "content": "x" * (BODY_LIMIT + 10)}])).encode()
    r = post(target.server.base_url, CHAT, body)
    assert r.status_code == 413
    assert_envelope(r)


def test_oversized_body_chunked(target: Target) -> None:
    """No Content-Length (chunked upload): the cap is enforced while the body streams in."""
    piece = b"x" * 2**20

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(BODY_LIMIT // len(piece) + 2):
            yield piece
        yield b'"}]}'

    r = httpx.post(
        target.server.base_url + CHAT,
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=120,
    )
    assert r.status_code == 413
    assert_envelope(r)


def _reset_peak_rss(pid: int) -> bool:
    """Start the process's peak resident memory (VmHWM) afresh from its current size (Linux only)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None, status
    return int(match.group(1)) / 1024


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None, status
    return int(match.group(1)) / 1024


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_ten_megabyte_content_is_refused_as_too_long(target: Target, path: str) -> None:
    """A 10 MB string under the 16 MiB body cap is refused for the prompt-length limit, counted in pieces
    before its full tokenization (which would take gigabytes): the server's peak memory barely grows."""
    text = "ab " * (10 * 2**20 // 3)
    if path == CHAT:
        body, param = chat(messages=[{"role": "user", "content": text}]), "messages"
    else:
        body, param = {"model": MODEL, "prompt": ["hi", text], "max_tokens": 2}, "prompt.1"
    pid = target.server.proc.pid
    measured = _reset_peak_rss(pid)
    before = _rss_mib(pid) if measured else 0.0
    r = post(target.server.base_url, path, json.dumps(body).encode())
    assert r.status_code == 400
    assert_envelope(r)
    err = r.json()["error"]
    assert str(MAX_PROMPT_LEN) in err["message"] and err["param"] == param
    if measured:
        growth = _peak_rss_mib(pid) - before
        assert growth < 512, f"the server's peak RSS grew by {growth:.0f} MiB"


def test_wrong_methods_and_routes(target: Target) -> None:
    base = target.server.base_url
    for method, path, status in (
        ("GET", CHAT, 405),
        ("PUT", COMPLETIONS, 405),
        ("DELETE", "/health", 405),
        ("GET", "/v1/nothing-here", 404),
        ("POST", "/v1/../../etc/passwd", 404),
    ):
        r = httpx.request(method, base + path, timeout=30)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        assert_envelope(r)


def test_nothing_reached_the_loopback_counter(target: Target) -> None:
    """Runs after the SSRF cases (file order): the server refused loopback URLs without connecting."""
    assert target.counter.hits == []


def test_server_healthy_and_unchanged_afterwards(target: Target) -> None:
    base = target.server.base_url
    assert target.server.proc.poll() is None
    assert httpx.get(base + "/health", timeout=10).status_code == 200
    assert normal_answer(base) == target.baseline  # greedy: exactly what it answered before the abuse
    metrics = httpx.get(base + "/metrics", timeout=10).text
    for gauge in ("slots_used", "num_requests_running", "num_requests_waiting"):
        assert metric_value(metrics, f"infinitevl:{gauge}") == 0.0, gauge
    assert metric_value(metrics, "infinitevl:requests_rejected_total", 'reason="invalid"') >= 40


def metric_value(text: str, name: str, label: str = "") -> float:
    """Sum of the samples of `name` (exact family sample name) whose labels contain `label`."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    assert seen, f"no sample {name} {label}"
    return total


# ---- redirects, on a server that allows loopback media -------------------------------------------------


@pytest.fixture(scope="module")
def private_target(tiny_ckpt_dir) -> Iterator[tuple[ServerProcess, LocalHTTP, LocalHTTP]]:
    """Server with --allow-private-media-networks, --allowed-media-domains 127.0.0.1 and 2 redirects max;
    `media` serves a PNG, `hops` redirects (both on loopback)."""
    require_cli()
    media = LocalHTTP(routes={"/img.png": (200, {"Content-Type": "image/png"}, png_bytes())}).start()
    png = media.url("/img.png")
    hops = LocalHTTP().start()
    hops.routes.update(
        {
            "/to-png": redirect(png),
            "/to-png-by-name": redirect(media.url("/img.png", host="localhost")),
            "/to-file": redirect("file:///etc/passwd"),
            "/to-data": redirect(data_url(png_bytes())),
            "/to-ftp": redirect(f"ftp://127.0.0.1:{media.port}/img.png"),
            "/chain/0": redirect(png),
            **{f"/chain/{i}": redirect(hops.url(f"/chain/{i - 1}")) for i in range(1, 6)},
        }
    )
    server = start_server(
        "--model",
        str(tiny_ckpt_dir),
        "--served-model-name",
        MODEL,
        "--max-num-seqs",
        "2",
        "--allow-private-media-networks",
        "--allowed-media-domains",
        "127.0.0.1",
        "--max-media-redirects",
        "2",
        "--log-level",
        "warning",
    )
    try:
        yield server, media, hops
    finally:
        server.stop()
        media.stop()
        hops.stop()
        server.log_path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("route", "status", "media_hits"),
    [
        ("/to-png", 200, 1),  # loopback allowed here: the redirect is followed to the image
        ("/chain/1", 200, 1),  # two redirects: within the limit
        ("/chain/4", 400, 0),  # five redirects: refused at the limit, the image is never fetched
        ("/to-png-by-name", 400, 0),  # `localhost` is outside the domain allowlist: refused before connecting
        ("/to-file", 400, 0),  # a redirect may not leave http(s)
        ("/to-data", 400, 0),
        ("/to-ftp", 400, 0),
    ],
)
def test_redirect_hops_are_checked(private_target, route: str, status: int, media_hits: int) -> None:
    server, media, hops = private_target
    before = len(media.hits)
    r = httpx.post(server.base_url + CHAT, json=image_chat(hops.url(route)), timeout=60)
    assert r.status_code == status, r.text
    if status >= 400:
        assert_envelope(r)
    assert len(media.hits) - before == media_hits
