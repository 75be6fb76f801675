"""HTTP operations: read timeouts on slow clients (real server process, raw sockets)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from api.settings import settings_from_args
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
    assert "connection: close" in got.head()
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
