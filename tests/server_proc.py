"""Run the real server (`python -m serving serve`) as a child process for black-box tests.

    with running_server("--model", str(tiny_ckpt_dir)) as base_url:
        httpx.get(f"{base_url}/health")

`start_server` returns the process handle too, for tests that signal it (drain).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120.0


def require_cli() -> None:
    """Skip the calling test when the server CLI has not been written yet."""
    if not (ROOT / "serving" / "cli.py").exists():
        pytest.skip("serving/cli.py does not exist yet: no server to start")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `timeout` seconds; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(*extra_args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `python -m serving serve --host 127.0.0.1 --port <free> --device cpu *extra_args` and wait
    until GET /health answers 200 (at most STARTUP_TIMEOUT_S). Raises RuntimeError with the server's log
    if it exits or never becomes healthy."""
    port = free_port()
    args = [sys.executable, "-m", "serving", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if "--device" not in extra_args:
        args += ["--device", "cpu"]
    args += list(extra_args)
    log_file = tempfile.NamedTemporaryFile(prefix="infinitevl-server-", suffix=".log", delete=False)  # noqa: SIM115
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(args, cwd=ROOT, env=child_env, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", Path(log_file.name))
    try:
        wait_healthy(server)
    except BaseException:
        server.stop(5)
        raise
    return server


def wait_healthy(server: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{server.log()[-4000:]}")


@contextlib.contextmanager
def running_server(*extra_args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A healthy server for the duration of the block; yields its base URL ("http://127.0.0.1:PORT")."""
    require_cli()
    server = start_server(*extra_args, env=env)
    try:
        yield server.base_url
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)
