"""Server-sent events framing in OpenAI's dialect: every event is exactly `data: <json>\\n\\n`, the stream ends
with `data: [DONE]\\n\\n`; no `event:`/`id:` lines and no keep-alive pings (they confuse some SSE clients)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pydantic_core
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

DONE = b"data: [DONE]\n\n"


def encode_json(obj: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> str:
    """Compact JSON of a response model or dict (no spaces, UTF-8 kept)."""
    if isinstance(obj, BaseModel):
        return obj.model_dump_json(exclude=exclude)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def data_event(obj: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> bytes:
    """One SSE event carrying `obj` as JSON on a single `data:` line."""
    return b"data: " + encode_json(obj, exclude).encode("utf-8") + b"\n\n"


class ChunkTemplate:
    """The SSE event of a streamed chunk whose only variable parts are one choice's index and text,
    made by concatenation: the event is rendered once through its response model with placeholders
    and cut around them, and the text is encoded by pydantic's own JSON encoder, so `render` gives
    the bytes `data_event` gives for the same chunk (about 1 µs instead of 7: one event per token per
    stream, on the event loop the engine thread shares the GIL with)."""

    TEXT = "@@infinitevl-text@@"  # the text placeholder; the index is rendered as 0

    def __init__(self, parts: tuple[bytes, bytes, bytes]) -> None:
        self._parts = parts

    @classmethod
    def of(cls, event: bytes) -> ChunkTemplate | None:
        """The template of `event` (rendered with index 0 and text TEXT), or None where either
        placeholder is not found exactly once (the caller keeps the model path)."""
        text, index = pydantic_core.to_json(cls.TEXT), b'"index":0,'
        if event.count(text) != 1 or event.count(index) != 1 or event.index(index) > event.index(text):
            return None
        head, rest = event.split(index)
        mid, tail = rest.split(text)
        return cls((head + b'"index":', b"," + mid, tail))

    def render(self, index: int, text: str) -> bytes:
        head, mid, tail = self._parts
        return b"".join((head, str(index).encode(), mid, pydantic_core.to_json(text), tail))


def sse_response(events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> EventSourceResponse:
    """Stream already-framed events; pings are disabled (interval 0)."""
    return EventSourceResponse(events, ping=0, sep="\n", headers=headers)
