"""Test doubles for the API layer: an engine that emits deterministic deltas and a byte-level processor.

FakeEngine implements `serving.types.EngineClient`. Choice `i` of a request produces the words
` w<k>` where k follows from a hash of (prompt ids, seed, i) and the token position, so equal requests with a
seed (or temperature 0) give equal text and different seeds give different text. It honours n, max_tokens,
stop strings (not included in the output unless include_stop_str_in_output), logprobs and abort; every
word is one token. `running` holds the ids of requests that have not finished (the "slots" in use).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from serving.errors import EngineDead, EngineOverloaded
from serving.types import (
    Delta,
    EngineHealth,
    GenerateRequest,
    LogprobEntry,
    MultiModalInputs,
    TokenLogprob,
    Usage,
)

VOCAB_SIZE = 1000
WORDS_PER_CHOICE_CYCLE = 97


def word_of(base: int, k: int) -> tuple[int, str]:
    """Token id and text of position k of a choice whose hash is `base`."""
    tid = (base + 7 * k) % WORDS_PER_CHOICE_CYCLE
    return tid, f" w{tid}"


class FakeEngine:
    """Deterministic EngineClient double; set `token_delay` to slow it down, `overloaded`/`dead` to fail."""

    def __init__(self, token_delay: float = 0.0):
        self.token_delay = token_delay
        self.overloaded = False
        self.dead = False
        self.draining = False
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.submitted: list[GenerateRequest] = []
        self.fail_with_error: str | None = None  # make every choice finish with "error"

    def info(self) -> dict[str, Any]:
        return {"model": "fake", "vocab_size": VOCAB_SIZE, "backend": "fake"}

    def health(self) -> EngineHealth:
        return EngineHealth(is_ready=not self.dead, is_alive=not self.dead, is_draining=self.draining)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.discard(request_id)

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if self.dead:
            raise EngineDead("fake engine is dead")
        if self.overloaded:
            raise EngineOverloaded("fake queue full", retry_after=2.0)
        request.sampling.validate(VOCAB_SIZE)
        if request.request_id in self.running:
            raise ValueError(f"duplicate request id {request.request_id}")
        assert tuple(request.positions.shape) == (3, len(request.prompt_token_ids))
        self.submitted.append(request)
        self.running.add(request.request_id)
        return self._run(request)

    def _base(self, request: GenerateRequest, index: int) -> int:
        sp = request.sampling
        if sp.seed is None and not sp.is_greedy:
            return random.randrange(1 << 30)
        key = f"{request.prompt_token_ids}|{sp.seed}|{index}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")

    async def _run(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        rid, sp = request.request_id, request.sampling
        choices = [_Choice(i, self._base(request, i)) for i in range(sp.n)]
        try:
            while any(not c.done for c in choices):
                for c in choices:
                    if c.done:
                        continue
                    if self.token_delay:
                        await asyncio.sleep(self.token_delay)
                    else:
                        await asyncio.sleep(0)
                    if rid not in self.running:  # aborted
                        return
                    yield self._step(request, c)
        finally:
            self.running.discard(rid)

    def _step(self, request: GenerateRequest, c: _Choice) -> Delta:
        sp = request.sampling
        prompt_len = len(request.prompt_token_ids)
        if self.fail_with_error:
            c.done = True
            return Delta(
                request.request_id, c.index, "", (), finish_reason="error", error=self.fail_with_error
            )
        tid, text = word_of(c.base, c.num_tokens)
        c.num_tokens += 1
        c.text += text
        finish, stop_reason = None, None
        for s in sp.stop:
            at = c.text.find(s)
            if at >= 0:
                keep = at + (len(s) if sp.include_stop_str_in_output else 0)
                text = text[: max(0, len(text) - (len(c.text) - keep))]
                finish, stop_reason = "stop", s
                break
        if finish is None and c.num_tokens >= sp.max_tokens:
            finish = "length"
        logprobs = None
        if sp.logprobs is not None:
            chosen = TokenLogprob(tid, text, -0.5, list(text.encode()))
            top = tuple(
                TokenLogprob(j, f" w{j}", -0.5 - j, list(f" w{j}".encode())) for j in range(sp.logprobs)
            )
            logprobs = (LogprobEntry(chosen, top),)
        c.done = finish is not None
        usage = Usage(prompt_len, c.num_tokens) if c.done else None
        return Delta(request.request_id, c.index, text, (tid,), logprobs, finish, stop_reason, usage)


@dataclass
class _Choice:
    index: int
    base: int
    num_tokens: int = 0
    text: str = ""
    done: bool = False


# ---- processor -----------------------------------------------------------------------------------------

IMAGE_TOKENS = 4  # placeholder tokens per image in the fake processor
VIDEO_TOKENS = 6


class ByteTokenizer:
    """Token ids are UTF-8 bytes (0..255)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [chr(i) if i < 256 else f"<{i}>" for i in ids]


@dataclass
class FakeProcessed:
    input_ids: list[int]
    positions: torch.Tensor
    rope_delta: int
    mm: MultiModalInputs | None


class FakeProcessor:
    """Chat template `<role>:content|` with `<image>`/`<video>` markers; records what it was given."""

    def __init__(self) -> None:
        self.tokenizer = ByteTokenizer()
        self.calls: list[tuple[str, list[Any], list[Any]]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        out = []
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                content = "".join(p["text"] if p["type"] == "text" else f"<{p['type']}>" for p in content)
            out.append(f"<{m['role']}>:{content}|")
        return "".join(out) + ("<assistant>:" if add_generation_prompt else "")

    def process(self, text: str, images: list[Any], videos: list[Any]) -> FakeProcessed:
        self.calls.append((text, list(images), list(videos)))
        if text.count("<image>") != len(images) or text.count("<video>") != len(videos):
            raise ValueError("placeholder count does not match the media")
        ids = self.tokenizer.encode(text) + [300] * (IMAGE_TOKENS * len(images) + VIDEO_TOKENS * len(videos))
        n = len(ids)
        positions = torch.arange(n).unsqueeze(0).expand(3, n).contiguous()
        mm = None
        if images:
            mm = MultiModalInputs(image_grid_thw=torch.tensor([[1, 4, 4]] * len(images)))
        return FakeProcessed(ids, positions, 0, mm)


# ---- a real uvicorn server on a free port ------------------------------------------------------------


class ServerThread:
    """Run an ASGI app with uvicorn on 127.0.0.1:<free port> in a daemon thread (context manager)."""

    def __init__(self, app: Any):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
