"""Streamed chunks made by concatenation (api.sse.ChunkTemplate) are the bytes the response models
give: for tricky texts, for every stream option that keeps the fast path, and through whole chat and
completion streams against the same streams with the fast path turned off."""

from __future__ import annotations

import asyncio
import json

import openapi_validator as oav
import pytest

from api import responses
from api.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from api.responses import StreamSpec, chat_stream, completion_stream, merged
from api.sse import DONE, ChunkTemplate, data_event
from serving.errors import EngineOverloaded
from serving.types import Delta, Usage

TEXTS = [
    "",
    " hello",
    'quote " and backslash \\ and slash /',
    "new\nline\ttab\r\x00\x1f\x7f",
    "é 日本 😀 \u2028 \u2029 \ufeff",
    "@@infinitevl-text",  # part of the placeholder
    '</script>{"index":0,}',
]


@pytest.mark.parametrize("with_usage", [False, True])
def test_chat_template_renders_the_model_bytes(with_usage: bool) -> None:
    exclude = None if with_usage else {"usage"}

    def event(index: int, text: str) -> bytes:
        chunk = ChatCompletionChunk(
            id="chatcmpl-x1", created=17, model="infinite/vl", choices=[
                ChatChunkChoice(index=index, delta=DeltaMessage(content=text))
            ], usage=None,
        )  # fmt: skip
        return data_event(chunk, exclude)

    template = ChunkTemplate.of(event(0, ChunkTemplate.TEXT))
    assert template is not None
    for index in (0, 3, 17):
        for text in TEXTS:
            assert template.render(index, text) == event(index, text)
            json.loads(template.render(index, text)[len(b"data: ") :])


def test_completion_template_renders_the_model_bytes() -> None:
    def event(index: int, text: str) -> bytes:
        choice = CompletionChoice(index=index, text=text, logprobs=None, finish_reason=None)
        return data_event(CompletionResponse(id="cmpl-2", created=5, model="m", choices=[choice]), {"usage"})

    template = ChunkTemplate.of(event(0, ChunkTemplate.TEXT))
    assert template is not None
    for index in (0, 1, 255):
        for text in TEXTS:
            assert template.render(index, text) == event(index, text)


def test_no_template_where_a_placeholder_is_ambiguous() -> None:
    """A model named like the placeholder: no template, the stream keeps the models. Quotes in a name
    are JSON-escaped, so a name holding '"index":0,' is no ambiguity."""

    def event(model: str) -> bytes:
        choice = CompletionChoice(index=0, text=ChunkTemplate.TEXT, logprobs=None, finish_reason=None)
        return data_event(CompletionResponse(id="c", created=1, model=model, choices=[choice]), {"usage"})

    assert ChunkTemplate.of(event(ChunkTemplate.TEXT)) is None
    template = ChunkTemplate.of(event('a"index":0,b'))
    assert template is not None
    assert template.render(2, "x") == event('a"index":0,b').replace(b'"index":0', b'"index":2').replace(
        b'"@@infinitevl-text@@"', b'"x"'
    )


def _deltas(n: int) -> list[Delta]:
    out = []
    for step, text in enumerate(TEXTS):
        for i in range(n):
            out.append(Delta("r", i, text, (step,)))
    for i in range(n):
        out.append(Delta("r", i, "end", (99,), finish_reason="length", usage=Usage(4, len(TEXTS) + 1)))
    return out


async def _aiter(items):
    for x in items:
        yield x


def _collect(gen) -> list[bytes]:
    async def run():
        return [b async for b in gen]

    return asyncio.run(run())


@pytest.mark.parametrize("include_usage,continuous", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streams_are_the_same_bytes_with_and_without_the_fast_path(
    monkeypatch: pytest.MonkeyPatch, kind: str, include_usage: bool, continuous: bool
) -> None:
    spec = StreamSpec(
        rid="id-1", created=3, model="tiny", n=2, prompt_len=4, include_usage=include_usage,
        want_logprobs=False, continuous_usage=continuous, prefixes=("echoed ", "") if kind == "completion" else (),
    )  # fmt: skip

    def stream() -> list[bytes]:
        deltas = _deltas(spec.n)
        if kind == "chat":
            return _collect(chat_stream(None, spec, deltas[0], _aiter(deltas[1:])))
        return _collect(completion_stream(None, spec, _aiter(deltas)))

    used = []
    real_of = ChunkTemplate.of
    monkeypatch.setattr(responses.ChunkTemplate, "of", lambda e: used.append(e) or real_of(e))
    fast = stream()
    monkeypatch.setattr(responses.ChunkTemplate, "of", lambda e: None)
    slow = stream()
    assert fast == slow
    assert fast[-1] == b"data: [DONE]\n\n" and len(fast) > 2 * len(TEXTS)
    assert bool(used) == (not continuous)  # running usage in every chunk keeps the models


def test_an_engine_error_after_the_stream_began_is_its_last_event() -> None:
    """A streamed batch begins once its prompts are queued: the engine refusing one later (here its queue
    is full) ends the stream with an error event in OpenAI's envelope, without [DONE]."""

    async def refused():
        yield Delta("r-1", 0, " b", (2,))
        raise EngineOverloaded("the queue is full", retry_after=1.0)

    spec = StreamSpec(rid="cmpl-e", created=1, model="m", n=2, prompt_len=2, include_usage=False,
                      want_logprobs=False)  # fmt: skip
    ok = _aiter([Delta("r-0", 0, " a", (1,), finish_reason="length", usage=Usage(1, 1))])
    events = _collect(completion_stream(None, spec, merged([ok, refused()], 1)))
    assert DONE not in events
    error = json.loads(events[-1][len(b"data: ") :])
    assert error["error"]["type"] == "rate_limit_error" and error["error"]["code"] == "server_overloaded"
    if oav.is_available():
        oav.validate(error, "ErrorResponse")
    texts = [json.loads(e[len(b"data: ") :])["choices"][0]["text"] for e in events[:-1]]
    assert sorted(texts) == [" a", " b"]
