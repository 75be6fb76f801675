"""HTTP operations: read timeouts on slow clients (real server process, raw sockets), CORS, X-Request-Id,
HEAD probes, /tokenize's vLLM fields, and the flags that set them."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fake_engine import ByteTokenizer, FakeEngine, FakeProcessor, ServerThread

from api.app import create_app, with_special_tokens
from api.settings import ServerSettings, settings_from_args
from serving.cli import build_parser
from tests.server_proc import require_cli, start_server

MODEL = "m"
KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def chat(text: str = "hi", **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2, **extra}


def assert_envelope(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


# ---- raw sockets -----------------------------------------------------------------------------------------


@dataclass
class Exchange:
    """What a socket client got: the bytes, whether the server closed, and after how many seconds."""

    data: bytes
    is_closed: bool
    seconds: float

    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1])

    def head(self) -> str:
        return self.data.partition(b"\r\n\r\n")[0].decode().lower()

    def json(self) -> dict:
        return json.loads(self.data.partition(b"\r\n\r\n")[2])


def trickle(url: str, pieces: list[bytes], every_s: float, max_s: float) -> Exchange:
    """Connect, send `pieces` one every `every_s` seconds, and read until the server closes or `max_s`."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    data = b""
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(0.05)
        next_send = t0
        while time.monotonic() - t0 < max_s:
            if pieces and time.monotonic() >= next_send:
                try:
                    sock.sendall(pieces.pop(0))
                except OSError:  # the server closed while we were sending
                    return Exchange(data, True, time.monotonic() - t0)
                next_send += every_s
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return Exchange(data, True, time.monotonic() - t0)
            if not chunk:
                return Exchange(data, True, time.monotonic() - t0)
            data += chunk
    return Exchange(data, False, time.monotonic() - t0)


def post_head(path: str = "/v1/chat/completions", content_length: int = 100_000, auth: bool = True) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines += [f"Authorization: Bearer {KEY}"] if auth else []
    lines += [f"Content-Length: {content_length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


READ_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def slow_server(tiny_ckpt_dir) -> Iterator[str]:
    require_cli()
    server = start_server(
        "--model", str(tiny_ckpt_dir), "--served-model-name", MODEL, "--api-key", KEY,
        "--request-read-timeout", str(READ_TIMEOUT_S),
    )  # fmt: skip
    try:
        yield server.base_url
    finally:
        server.stop(10)
        server.log_path.unlink(missing_ok=True)


def test_a_body_sent_one_byte_at_a_time_gets_408(slow_server):
    got = trickle(slow_server, [post_head(), b"{", *[b" "] * 50], every_s=0.2, max_s=10)
    assert got.status() == 408 and got.is_closed
    assert READ_TIMEOUT_S <= got.seconds < READ_TIMEOUT_S + 2
    assert "connection: close" in got.head() and "x-request-id:" in got.head()
    assert got.json()["error"]["code"] == "request_read_timeout"


def test_a_head_sent_one_line_at_a_time_gets_408(slow_server):
    lines = [b"POST /v1/chat/completions HTTP/1.1\r\n", *[b"X-Slow: yes\r\n"] * 50]
    got = trickle(slow_server, lines, every_s=0.2, max_s=10)
    assert got.status() == 408 and got.is_closed
    assert READ_TIMEOUT_S <= got.seconds < READ_TIMEOUT_S + 2
    assert set(got.json()["error"]) == {"message", "type", "param", "code"}


def test_a_connection_that_sends_nothing_is_closed(slow_server):
    got = trickle(slow_server, [], every_s=1, max_s=10)
    assert got.is_closed and got.data == b""
    assert READ_TIMEOUT_S <= got.seconds < READ_TIMEOUT_S + 2


def test_the_next_request_on_a_kept_alive_connection_has_its_own_deadline(slow_server):
    first = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
    got = trickle(slow_server, [first, b"GET /health HTTP/1.1\r\n", *[b"X-Slow: yes\r\n"] * 50], 0.2, 10)
    assert got.data.startswith(b"HTTP/1.1 200") and got.data.count(b"HTTP/1.1 408") == 1 and got.is_closed


def test_a_request_that_arrives_in_time_is_served(slow_server):
    body = json.dumps(chat()).encode()
    pieces = [post_head(content_length=len(body)), body[:10], body[10:]]
    got = trickle(slow_server, pieces, every_s=0.3, max_s=10)
    assert got.status() == 200, got.data
    assert "connection: close" not in got.head()


def test_a_large_body_on_a_slow_but_steady_link_is_served(slow_server):
    """A body that takes longer than the read timeout but arrives steadily (about 200 KB/s, above the
    64 KiB/s the deadline moves on by) is not cut."""
    body = json.dumps(chat())[:-1].encode() + b" " * 400_000 + b"}"
    step = 40_000
    pieces = [post_head(content_length=len(body))] + [body[i : i + step] for i in range(0, len(body), step)]
    got = trickle(slow_server, pieces, every_s=0.2, max_s=20)
    assert got.seconds > READ_TIMEOUT_S  # it took longer than the timeout alone allows
    assert got.status() == 200, got.data[:300]


def test_an_answer_before_the_whole_body_closes_the_connection(slow_server):
    got = trickle(slow_server, [post_head(auth=False), *[b" "] * 50], every_s=0.2, max_s=10)
    assert got.status() == 401 and got.is_closed and got.seconds < READ_TIMEOUT_S
    assert "connection: close" in got.head()


def test_request_read_timeout_flag():
    args = build_parser().parse_args(["serve"])
    assert settings_from_args(args, model_path="p").request_read_timeout_s == 30.0
    args = build_parser().parse_args(["serve", "--request-read-timeout", "0"])
    with pytest.raises(ValueError, match="request_read_timeout_s"):
        settings_from_args(args, model_path="p")


# ---- in-process apps -------------------------------------------------------------------------------------


def serve(settings: ServerSettings, processor: FakeProcessor | None = None):
    app = create_app(FakeEngine(), processor or FakeProcessor(), settings)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a fault")

    return app


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[object, httpx.Client]]:
    app = serve(ServerSettings(served_model_name=MODEL, model_path="p", api_keys=(KEY,)))
    with ServerThread(app) as server, httpx.Client(base_url=server.base_url, timeout=10) as http:
        yield app, http


@pytest.fixture(scope="module")
def http(keyed) -> httpx.Client:
    return keyed[1]


# ---- X-Request-Id


def test_a_valid_client_request_id_is_echoed(http):
    rid = "req_ABC-123.x/y:z"
    assert http.get("/v1/models", headers={**AUTH, "X-Request-Id": rid}).headers["x-request-id"] == rid


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "caf\u00e9"])
def test_an_invalid_client_request_id_is_replaced(http, bad):
    sent = bad.encode("utf-8")
    r = http.get(
        "/v1/models", headers=[(b"Authorization", f"Bearer {KEY}".encode()), (b"X-Request-Id", sent)]
    )
    assert GENERATED_ID.fullmatch(r.headers["x-request-id"])


def test_every_response_carries_a_request_id(http, keyed):
    ids = [
        http.get("/health").headers.get("x-request-id"),
        http.get("/v1/models").headers.get("x-request-id"),  # 401
        http.get("/no/such/route", headers=AUTH).headers.get("x-request-id"),  # 404
        http.post("/v1/chat/completions", json={"model": MODEL}, headers=AUTH).headers.get("x-request-id"),
        http.get("/boom", headers=AUTH).headers.get("x-request-id"),  # 500 from Starlette's outermost handler
    ]
    assert all(i and GENERATED_ID.fullmatch(i) for i in ids) and len(set(ids)) == len(ids)
    body = chat(stream=True)
    with http.stream("POST", "/v1/chat/completions", json=body, headers={**AUTH, "X-Request-Id": "s1"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"] == "s1"
        r.read()


# ---- HEAD


def test_head_health_and_models(http, keyed):
    for path in ("/health", "/v1/models", f"/v1/models/{MODEL}"):
        head = http.head(path, headers=AUTH)
        get = http.get(path, headers=AUTH)
        assert head.status_code == get.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
    assert http.head("/v1/models/other", headers=AUTH).status_code == 404
    assert http.head("/v1/models").status_code == 401
    app = keyed[0]
    app.state.draining = True
    try:
        assert http.head("/health").status_code == 503
    finally:
        app.state.draining = False


def test_head_is_not_in_the_openapi_document(http):
    paths = http.get("/openapi.json", headers=AUTH).json()["paths"]
    assert set(paths["/health"]) == {"get"} and set(paths["/v1/models"]) == {"get"}


# ---- CORS

PREFLIGHT = {
    "Origin": "http://client.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_preflight_needs_no_key_and_allows_any_origin_by_default(http):
    r = http.options("/v1/chat/completions", headers=PREFLIGHT)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "access-control-allow-credentials" not in r.headers
    assert r.headers["x-request-id"]


def test_cors_headers_on_answers_and_errors(http):
    origin = {"Origin": "http://client.example"}
    ok = http.post("/v1/chat/completions", json=chat(), headers={**AUTH, **origin})
    denied = http.post("/v1/chat/completions", json=chat(), headers=origin)
    for r in (ok, denied):
        assert r.headers["access-control-allow-origin"] == "*"
        assert "x-request-id" in r.headers["access-control-expose-headers"]
    assert ok.status_code == 200 and denied.status_code == 401


def test_an_options_request_that_is_not_a_preflight_needs_the_key(http):
    assert_envelope(http.options("/v1/chat/completions"), 401, "invalid_api_key")
    assert_envelope(http.options("/no/such/route"), 401, "invalid_api_key")  # no anonymous route probing
    assert_envelope(http.options("/v1/chat/completions", headers=AUTH), 405)


def test_restricted_origins_methods_headers_and_credentials():
    settings = ServerSettings(
        served_model_name=MODEL,
        model_path="p",
        allowed_origins=("http://good.example",),
        allowed_methods=("GET", "POST"),
        allowed_headers=("authorization", "content-type"),
        allow_credentials=True,
    )
    with ServerThread(serve(settings)) as server, httpx.Client(base_url=server.base_url) as http:
        good = http.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "http://good.example"})
        assert good.status_code == 200
        assert good.headers["access-control-allow-origin"] == "http://good.example"
        assert good.headers["access-control-allow-credentials"] == "true"
        bad_origin = http.options(
            "/v1/chat/completions", headers={**PREFLIGHT, "Origin": "http://evil.example"}
        )
        assert "origin" in assert_envelope(bad_origin, 400, "cors_refused")["message"]
        assert "access-control-allow-origin" not in bad_origin.headers
        bad_method = {**PREFLIGHT, "Origin": "http://good.example", "Access-Control-Request-Method": "DELETE"}
        assert "method" in assert_envelope(http.options("/health", headers=bad_method), 400)["message"]
        r = http.get("/health", headers={"Origin": "http://good.example"})
        assert r.headers["access-control-allow-origin"] == "http://good.example"
        assert (
            "access-control-allow-origin"
            not in http.get("/health", headers={"Origin": "http://evil.example"}).headers
        )


@pytest.mark.parametrize(
    ("value", "expected"),
    [('["http://a.example", "http://b.example"]', ("http://a.example", "http://b.example")),
     ("http://a.example, http://b.example", ("http://a.example", "http://b.example")),
     ('["*"]', ("*",))],
)  # fmt: skip
def test_cors_flags(value, expected):
    args = build_parser().parse_args(["serve", "--allowed-origins", value, "--allow-credentials"])
    settings = settings_from_args(args, model_path="p")
    assert settings.allowed_origins == expected and settings.allow_credentials
    defaults = settings_from_args(build_parser().parse_args(["serve"]), model_path="p")
    assert defaults.allowed_origins == defaults.allowed_methods == defaults.allowed_headers == ("*",)
    assert not defaults.allow_credentials


@pytest.mark.parametrize("value", ['["a", 1]', "[not json", '{"a": 1}'])
def test_bad_cors_flags_are_refused(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--allowed-origins", value])
    assert "--allowed-origins" in capsys.readouterr().err


# ---- /tokenize


class BosEosTokenizer(ByteTokenizer):
    """Bytes, with BOS 1 and EOS 2 around a text when special tokens are asked for."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = super().encode(text)
        return [1, *ids, 2] if add_special_tokens else ids


@pytest.fixture(scope="module")
def tok_http() -> Iterator[httpx.Client]:
    processor = FakeProcessor()
    processor.tokenizer = BosEosTokenizer()
    settings = ServerSettings(served_model_name=MODEL, model_path="p", max_model_len=4096)
    with ServerThread(serve(settings, processor)) as server, httpx.Client(base_url=server.base_url) as http:
        yield http


def test_tokenize_shape_matches_vllm(tok_http):
    r = tok_http.post("/tokenize", json={"prompt": "ab"})
    assert r.json() == {"count": 2, "max_model_len": 4096, "tokens": [97, 98], "token_strs": None}


def test_tokenize_add_generation_prompt(tok_http):
    messages = [{"role": "user", "content": "hi"}]
    with_prompt = tok_http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    without = tok_http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bytes(with_prompt).decode() == "<user>:hi|<assistant>:"
    assert bytes(without["tokens"]).decode() == "<user>:hi|" and without["count"] == len("<user>:hi|")


def test_tokenize_return_token_strs(tok_http):
    r = tok_http.post("/tokenize", json={"prompt": "ab", "return_token_strs": True}).json()
    assert r["tokens"] == [97, 98] and r["token_strs"] == ["a", "b"]


def test_tokenize_add_special_tokens(tok_http):
    assert tok_http.post("/tokenize", json={"prompt": "ab"}).json()["tokens"] == [97, 98]
    r = tok_http.post("/tokenize", json={"prompt": "ab", "add_special_tokens": True}).json()
    assert r["tokens"] == [1, 97, 98, 2] and r["count"] == 4
    messages = [{"role": "user", "content": "x"}]
    r = tok_http.post("/tokenize", json={"messages": messages, "add_special_tokens": True}).json()
    assert r["tokens"][0] == 1 and r["tokens"][-1] == 2


def test_tokenize_an_empty_prompt(tok_http):
    r = tok_http.post("/tokenize", json={"prompt": ""}).json()
    assert r["tokens"] == [] and r["count"] == 0
    r = tok_http.post("/tokenize", json={"prompt": "", "add_special_tokens": True}).json()
    assert r["tokens"] == [1, 2]


def test_tokenize_refusals(tok_http):
    messages = [{"role": "user", "content": "x"}]
    body = {"messages": messages, "continue_final_message": True}
    assert assert_envelope(tok_http.post("/tokenize", json=body), 400)["param"] == "continue_final_message"
    bad_flag = {"prompt": "a", "return_token_strs": "yes"}
    assert assert_envelope(tok_http.post("/tokenize", json=bad_flag), 400)["param"] == "return_token_strs"
    bad_flag = {"messages": messages, "add_generation_prompt": 1}
    assert assert_envelope(tok_http.post("/tokenize", json=bad_flag), 400)["param"] == "add_generation_prompt"


def test_with_special_tokens_on_a_tokenizer_without_any():
    assert with_special_tokens(ByteTokenizer(), [5, 6]) == [5, 6]
    assert with_special_tokens(BosEosTokenizer(), []) == [1, 2]
