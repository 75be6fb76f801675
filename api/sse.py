"""Server-sent events framing in OpenAI's dialect: every event is exactly `data: <json>\\n\\n`, the stream ends
with `data: [DONE]\\n\\n`; no `event:`/`id:` lines and no keep-alive pings (they confuse some SSE clients)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

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


def sse_response(events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> EventSourceResponse:
    """Stream already-framed events; pings are disabled (interval 0)."""
    return EventSourceResponse(events, ping=0, sep="\n", headers=headers)
