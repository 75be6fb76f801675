"""Engine deltas -> OpenAI responses: collected into one body, or framed as stream chunks.

Both paths abort the engine request when the client goes away: non-streaming requests race the engine
against `http.disconnect`; a streaming generator aborts in its `finally` when it is cancelled or closed
before the last choice finished.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request

from api.errors import APIError, error_body
from api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    ResponseMessage,
    TokenLogprobOut,
    TopLogprob,
    UsageInfo,
)
from api.sse import DONE, data_event
from serving.types import Delta, EngineClient, GenerateRequest, LogprobEntry

MIN_LOGPROB = -9999.0  # OpenAI's stand-in for "very unlikely" (JSON has no -inf)


class ClientDisconnected(APIError):
    """The client closed the connection before the response was ready (nobody reads this answer)."""

    def __init__(self) -> None:
        super().__init__("client closed the request", 499, code="client_closed_request")


@dataclass
class ChoiceResult:
    """Everything one choice produced, accumulated over its deltas."""

    index: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, d: Delta) -> None:
        self.texts.append(d.text)
        self.logprobs.extend(d.logprobs or ())
        self.num_tokens += len(d.token_ids)
        if d.finish_reason is not None:
            self.finish_reason, self.stop_reason, self.error = d.finish_reason, d.stop_reason, d.error
            if d.usage is not None:
                self.num_tokens = d.usage.completion_tokens


def openai_finish_reason(reason: str | None) -> str | None:
    """Engine reasons -> OpenAI's enum: a cut-short answer (abort, timeout) reads as "length"."""
    if reason is None or reason == "stop":
        return reason
    return "length"


def usage_of(prompt_len: int, results: list[ChoiceResult]) -> UsageInfo:
    completion = sum(r.num_tokens for r in results)
    return UsageInfo(
        prompt_tokens=prompt_len, completion_tokens=completion, total_tokens=prompt_len + completion
    )


# ---- logprobs ------------------------------------------------------------------------------------------


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


def chat_logprobs(entries: list[LogprobEntry] | tuple[LogprobEntry, ...]) -> ChoiceLogprobs:
    """Engine logprobs -> chat format `{content: [{token, logprob, bytes, top_logprobs}]}`."""
    content = [
        TokenLogprobOut(
            token=e.chosen.token,
            logprob=_finite(e.chosen.logprob),
            bytes=e.chosen.bytes,
            top_logprobs=[
                TopLogprob(token=t.token, logprob=_finite(t.logprob), bytes=t.bytes) for t in e.top
            ],
        )
        for e in entries
    ]
    return ChoiceLogprobs(content=content, refusal=None)


def legacy_logprobs(
    entries: list[LogprobEntry] | tuple[LogprobEntry, ...], offset: int = 0
) -> CompletionLogprobs:
    """Engine logprobs -> legacy completions format; `offset` is the text offset of the first token."""
    out = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    for e in entries:
        out.text_offset.append(offset)
        offset += len(e.chosen.token)
        out.tokens.append(e.chosen.token)
        out.token_logprobs.append(_finite(e.chosen.logprob))
        out.top_logprobs.append({t.token: _finite(t.logprob) for t in e.top})
    return out


# ---- running a request ---------------------------------------------------------------------------------


async def wait_disconnect(request: Request) -> None:
    """Return once the client has disconnected (the body must already have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # never spin if a transport answers with something else


async def race_disconnect(request: Request, awaitable: Awaitable[Any]) -> Any:
    """Await `awaitable` unless the client disconnects first (then raise ClientDisconnected)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected()


async def abort_quietly(engine: EngineClient, request_id: str) -> None:
    """Abort, shielded from the cancellation that is usually why we abort."""
    with anyio.CancelScope(shield=True):
        await engine.abort(request_id)


async def start(
    engine: EngineClient, greq: GenerateRequest, request: Request
) -> tuple[AsyncIterator[Delta], Delta | None]:
    """Submit and wait for the first delta, so queue-full and engine errors still get a proper status."""
    it = aiter(engine.generate(greq))
    try:
        first = await race_disconnect(request, _next_or_none(it))
    except BaseException:
        await abort_quietly(engine, greq.request_id)
        raise
    return it, first


async def _next_or_none(it: AsyncIterator[Delta]) -> Delta | None:
    try:
        return await anext(it)
    except StopAsyncIteration:
        return None


async def _chain(first: Delta | None, it: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    if first is None:
        return
    yield first
    async for d in it:
        yield d


async def _collect(first: Delta | None, it: AsyncIterator[Delta], n: int) -> list[ChoiceResult]:
    results = [ChoiceResult(i) for i in range(n)]
    async for d in _chain(first, it):
        results[d.index].add(d)
    return results


async def collect(
    engine: EngineClient,
    greq: GenerateRequest,
    request: Request,
    first: Delta | None,
    it: AsyncIterator[Delta],
) -> list[ChoiceResult]:
    """Gather every choice; abort when the client leaves; a choice that failed makes a 500."""
    done = False
    try:
        results = await race_disconnect(request, _collect(first, it, greq.sampling.n))
        done = True
    finally:
        if not done:
            await abort_quietly(engine, greq.request_id)
    for r in results:
        if r.finish_reason == "error" or r.finish_reason is None:
            raise APIError(f"generation failed: {r.error or 'the engine ended the request early'}", 500)
    return results


# ---- non-streaming bodies ------------------------------------------------------------------------------


def chat_response(
    rid: str, created: int, model: str, prompt_len: int, results: list[ChoiceResult], want_logprobs: bool
) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=r.index,
            message=ResponseMessage(content=r.text),
            logprobs=chat_logprobs(r.logprobs) if want_logprobs else None,
            finish_reason=openai_finish_reason(r.finish_reason),
            stop_reason=r.stop_reason,
        )
        for r in results
    ]
    return ChatCompletionResponse(
        id=rid, created=created, model=model, choices=choices, usage=usage_of(prompt_len, results)
    )


def completion_response(
    rid: str, created: int, model: str, prompt_len: int, results: list[ChoiceResult], want_logprobs: bool
) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=r.index,
            text=r.text,
            logprobs=legacy_logprobs(r.logprobs) if want_logprobs else None,
            finish_reason=openai_finish_reason(r.finish_reason),
        )
        for r in results
    ]
    return CompletionResponse(
        id=rid, created=created, model=model, choices=choices, usage=usage_of(prompt_len, results)
    )


# ---- streams -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """What a stream needs to know besides the deltas."""

    rid: str
    created: int
    model: str
    n: int
    prompt_len: int
    include_usage: bool
    want_logprobs: bool


def _error_event(d: Delta) -> bytes:
    return data_event(
        error_body(f"generation failed: {d.error or 'unknown error'}", "server_error", None, "internal_error")
    )


async def chat_stream(
    engine: EngineClient, spec: StreamSpec, first: Delta | None, it: AsyncIterator[Delta]
) -> AsyncIterator[bytes]:
    """Chat chunks: role chunk per choice, content chunks, finish chunk per choice, usage chunk, [DONE]."""
    exclude = None if spec.include_usage else {"usage"}

    def chunk(choice: ChatChunkChoice) -> bytes:
        c = ChatCompletionChunk(id=spec.rid, created=spec.created, model=spec.model, choices=[choice])
        return data_event(c, exclude)

    results = [ChoiceResult(i) for i in range(spec.n)]
    finished = False
    try:
        for i in range(spec.n):
            yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
        async for d in _chain(first, it):
            results[d.index].add(d)
            if d.finish_reason == "error":
                yield _error_event(d)
                return
            if d.text or d.logprobs:
                lp = chat_logprobs(d.logprobs or ()) if spec.want_logprobs else None
                yield chunk(ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text), logprobs=lp))
            if d.finish_reason is not None:
                reason = openai_finish_reason(d.finish_reason)
                yield chunk(ChatChunkChoice(index=d.index, delta=DeltaMessage(), finish_reason=reason))
        finished = True
        if spec.include_usage:
            last = ChatCompletionChunk(
                id=spec.rid,
                created=spec.created,
                model=spec.model,
                choices=[],
                usage=usage_of(spec.prompt_len, results),
            )
            yield data_event(last)
        yield DONE
    finally:
        if not finished:
            await abort_quietly(engine, spec.rid)


async def completion_stream(
    engine: EngineClient, spec: StreamSpec, first: Delta | None, it: AsyncIterator[Delta]
) -> AsyncIterator[bytes]:
    """Legacy completion chunks (same shape as the response), a usage chunk if asked, then [DONE]."""
    exclude = None if spec.include_usage else {"usage"}

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> bytes:
        c = CompletionResponse(
            id=spec.rid, created=spec.created, model=spec.model, choices=choices, usage=usage
        )
        return data_event(c, exclude)

    results = [ChoiceResult(i) for i in range(spec.n)]
    offsets = [0] * spec.n
    finished = False
    try:
        async for d in _chain(first, it):
            results[d.index].add(d)
            if d.finish_reason == "error":
                yield _error_event(d)
                return
            lp = legacy_logprobs(d.logprobs or (), offsets[d.index]) if spec.want_logprobs else None
            offsets[d.index] += len(d.text)
            reason = openai_finish_reason(d.finish_reason)
            yield chunk([CompletionChoice(index=d.index, text=d.text, logprobs=lp, finish_reason=reason)])
        finished = True
        if spec.include_usage:
            yield data_event(
                CompletionResponse(
                    id=spec.rid,
                    created=spec.created,
                    model=spec.model,
                    choices=[],
                    usage=usage_of(spec.prompt_len, results),
                )
            )
        yield DONE
    finally:
        if not finished:
            await abort_quietly(engine, spec.rid)
