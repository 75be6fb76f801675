"""Black-box graceful shutdown: SIGTERM while streams run lets them finish, refuses new work with 503 +
Retry-After, reports 503 on /health, and exits 0 (what a Kubernetes rollout relies on); a stalled upload
does not hold it up."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.server_proc import require_cli, start_server

NUM_STREAMS = 5
MAX_TOKENS = 200


class Stream(threading.Thread):
    """One streaming completion read to its end; records the tokens' chunks and the finish reason."""

    def __init__(self, base_url: str, index: int) -> None:
        super().__init__(daemon=True)
        self.base_url, self.index = base_url, index
        self.started = threading.Event()
        self.chunks = 0
        self.finish_reason: str | None = None
        self.saw_done = False
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {
            "model": "tiny",
            "prompt": f"story number {self.index}",
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            with (
                httpx.Client(base_url=self.base_url, timeout=120) as client,
                client.stream("POST", "/v1/completions", json=body) as response,
            ):
                response.raise_for_status()
                for line in response.iter_lines():
                    self.read(line)
        except BaseException as err:  # reported by the test thread
            self.error = err
        finally:
            self.started.set()

    def read(self, line: str) -> None:
        if line == "data: [DONE]":
            self.saw_done = True
        elif line.startswith("data: "):
            self.chunks += 1
            self.started.set()
            for choice in json.loads(line[6:]).get("choices", []):
                self.finish_reason = choice.get("finish_reason") or self.finish_reason


@pytest.fixture
def server(tiny_ckpt_dir):
    require_cli()
    proc = start_server(
        "--model",
        str(tiny_ckpt_dir),
        "--served-model-name",
        "tiny",
        "--max-num-seqs",
        "8",
        "--shutdown-timeout",
        "60",
    )
    yield proc
    proc.stop(10)
    proc.log_path.unlink(missing_ok=True)


def test_sigterm_drains_streams_and_exits_zero(server):
    streams = [Stream(server.base_url, i) for i in range(NUM_STREAMS)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(60), "a stream produced nothing"
        assert stream.error is None, stream.error
    assert all(s.finish_reason is None for s in streams), "streams ended before the signal: raise MAX_TOKENS"

    server.proc.terminate()  # SIGTERM, as the kubelet sends after preStop

    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        # the signal is handled asynchronously: allow the server a moment to notice it
        deadline = time.monotonic() + 5
        while (health := client.get("/health")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 4, "ignore_eos": True}
        )
    assert health.status_code == 503
    assert any(s.is_alive() for s in streams), "streams finished before the checks: raise MAX_TOKENS"
    assert refused.status_code == 503
    assert float(refused.headers["Retry-After"]) > 0
    assert refused.json()["error"]["message"]

    for stream in streams:
        stream.join(120)
        assert not stream.is_alive()
        assert stream.error is None, stream.error
        assert stream.finish_reason == "length", (stream.index, stream.finish_reason)
        assert stream.saw_done
    assert server.proc.wait(90) == 0, server.log()[-3000:]


def test_a_stalled_upload_does_not_hold_up_the_drain(server):
    """A request still uploading its body when SIGTERM comes is answered 503 at once (it has not started;
    the client retries elsewhere), and idle or half-sent connections are closed: the process exits within
    seconds, not after --shutdown-timeout."""
    host, port = server.base_url.removeprefix("http://").split(":")
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    with (
        socket.create_connection((host, int(port))) as upload,
        socket.create_connection((host, int(port))) as idle,
        socket.create_connection((host, int(port))) as half_head,
    ):
        upload.sendall(head + b"Content-Length: 100000\r\n\r\n{")
        half_head.sendall(head)
        time.sleep(0.5)  # the upload's request has reached the app
        t0 = time.monotonic()
        server.proc.terminate()
        upload.settimeout(10)
        answer = b"".join(iter(lambda: upload.recv(65536), b""))  # up to the server's close
        assert server.proc.wait(15) == 0, server.log()[-3000:]
        seconds = time.monotonic() - t0
        for sock in (idle, half_head):
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed by the server
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 503"), answer
    assert b"connection: close" in rest.lower() and b"retry-after:" in rest.lower()
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "server_draining"
    assert seconds < 10
    assert "graceful shutdown exceeded" not in server.log()
