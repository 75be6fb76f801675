"""Engine deltas -> OpenAI responses: collected into one body, or framed as stream chunks.

Both paths abort the engine request when the client goes away: non-streaming requests race the engine
against `http.disconnect`; a streaming generator aborts in its `finally` when it is cancelled or closed
before the last choice finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from starlette.requests import Request

from api.errors import APIError, engine_error, error_body
from api.logprobs import TextOffsets, chat_logprobs, legacy_logprobs, token_raw
from api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    ResponseMessage,
    UsageInfo,
)
from api.sse import DONE, ChunkTemplate, data_event
from serving.errors import EngineError
from serving.types import Delta, EngineClient, GenerateRequest, LogprobEntry, Usage

logger = logging.getLogger(__name__)


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
    prompt_logprobs: tuple[LogprobEntry, ...] = ()  # an echo's prompt, from the first delta

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, d: Delta) -> None:
        if d.prompt_logprobs:
            self.prompt_logprobs = d.prompt_logprobs
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


async def abort_all(engine: EngineClient, greqs: list[GenerateRequest]) -> None:
    """`abort_quietly` for each of the requests."""
    for g in greqs:
        await abort_quietly(engine, g.request_id)


@dataclass(frozen=True)
class Started:
    """One submitted engine request: its deltas, the first of which has arrived."""

    greq: GenerateRequest
    it: AsyncIterator[Delta]
    first: Delta | None


async def submit_all(engine: EngineClient, greqs: list[GenerateRequest]) -> list[AsyncIterator[Delta]]:
    """Submit every request (the deltas of each, none read yet); the engine refuses one at once (queue
    full, invalid, dead): then the ones already submitted are aborted and the error raised."""
    its: list[AsyncIterator[Delta]] = []
    try:
        for g in greqs:
            its.append(aiter(engine.generate(g)))
    except BaseException:
        await abort_all(engine, greqs)
        raise
    return its


async def start_all(engine: EngineClient, greqs: list[GenerateRequest], request: Request) -> list[Started]:
    """Submit every request and wait for the first delta of each, so queue-full and engine errors still
    get a proper status; if any of them fails, or the client leaves, all of them are aborted."""
    its = await submit_all(engine, greqs)
    try:
        firsts = await race_disconnect(request, _gather(*(_next_or_none(it) for it in its), errors=True))
        error = next((f for f in firsts if isinstance(f, BaseException)), None)
        if error is not None:
            raise error
    except BaseException:
        await abort_all(engine, greqs)
        raise
    return [Started(g, it, first) for g, it, first in zip(greqs, its, firsts, strict=True)]


async def _gather(*aws: Awaitable[Any], errors: bool = False) -> list[Any]:
    """asyncio.gather inside a coroutine: race_disconnect cancels it as a task, so a cancelled gather
    never leaves an unretrieved exception behind. errors: exceptions are returned, not raised."""
    return list(await asyncio.gather(*aws, return_exceptions=errors))


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


def deltas_of(started: Started) -> AsyncIterator[Delta]:
    """All the deltas of a started request, its first one included."""
    return _chain(started.first, started.it)


def without_completion(d: Delta) -> Delta:
    """The delta of a max_tokens 0 completion with its generated part left out: the engine ran one token
    (the prefill that scores the prompt); the answer is the prompt's part alone, finish_reason "length"
    and no completion tokens."""
    usage = None if d.usage is None else Usage(d.usage.prompt_tokens, 0)
    reason = "length" if d.finish_reason == "stop" else d.finish_reason
    return replace(
        d, text="", token_ids=(), logprobs=None, finish_reason=reason, stop_reason=None, usage=usage
    )


async def _collect(
    first: Delta | None, it: AsyncIterator[Delta], n: int, prompt_only: bool = False
) -> list[ChoiceResult]:
    results = [ChoiceResult(i) for i in range(n)]
    async for d in _chain(first, it):
        results[d.index].add(without_completion(d) if prompt_only else d)
    return results


async def collect(
    engine: EngineClient,
    greq: GenerateRequest,
    request: Request,
    first: Delta | None,
    it: AsyncIterator[Delta],
) -> list[ChoiceResult]:
    """`collect_all` for one request."""
    return await collect_all(engine, [Started(greq, it, first)], request)


async def collect_all(
    engine: EngineClient, started: list[Started], request: Request, prompt_only: bool = False
) -> list[ChoiceResult]:
    """Gather every choice of every request, in order (choice c of request p gets index p * n + c);
    abort them all when the client leaves; a choice that failed makes a 500. prompt_only: a max_tokens 0
    completion (`without_completion`)."""
    done = False
    try:
        per_request = await race_disconnect(
            request, _gather(*(_collect(s.first, s.it, s.greq.sampling.n, prompt_only) for s in started))
        )
        done = True
    finally:
        if not done:
            await abort_all(engine, [s.greq for s in started])
    results: list[ChoiceResult] = []
    for p, choices in enumerate(per_request):
        for r in choices:
            r.index += p * len(choices)
            results.append(r)
    for r in results:
        if r.finish_reason == "error" or r.finish_reason is None:
            raise APIError(f"generation failed: {r.error or 'the engine ended the request early'}", 500)
    return results


async def merged(streams: list[AsyncIterator[Delta]], n: int) -> AsyncIterator[Delta]:
    """The deltas of every request (`streams[p]`: all deltas of request p) as one stream, in arrival
    order, choice c of request p re-indexed p * n + c; an engine error of any of them is raised here."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield d
        return
    queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()

    async def pump(p: int, deltas: AsyncIterator[Delta]) -> None:
        try:
            async for d in deltas:
                queue.put_nowait(replace(d, index=p * n + d.index))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(e)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(p, deltas)) for p, deltas in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


# ---- legacy logprobs -----------------------------------------------------------------------------------


def choice_logprobs(
    echo: str,
    prompt: Sequence[LogprobEntry],
    text: str,
    entries: Sequence[LogprobEntry],
    generated: TextOffsets,
) -> CompletionLogprobs:
    """Legacy logprobs of (the next part of) a choice: an echoed prompt's text and entries, whole, then
    generated text and entries; `generated` carries the generated text's offsets from chunk to chunk (it
    starts at len(echo))."""
    offsets = TextOffsets().offsets(echo, [token_raw(e.chosen) for e in prompt]) if prompt else []
    offsets += generated.offsets(text, [token_raw(e.chosen) for e in entries])
    return legacy_logprobs([*prompt, *entries], offsets)


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
    rid: str,
    created: int,
    model: str,
    prompt_len: int,
    results: list[ChoiceResult],
    want_logprobs: bool,
    prefixes: tuple[str, ...] = (),
) -> CompletionResponse:
    """prompt_len: the prompt tokens of all prompts; prefixes: per choice, the echoed prompt text."""
    choices = []
    for r in results:
        echo = prefixes[r.index] if prefixes else ""
        lp = None
        if want_logprobs:
            lp = choice_logprobs(echo, r.prompt_logprobs, r.text, r.logprobs, TextOffsets(len(echo)))
        choices.append(
            CompletionChoice(
                index=r.index,
                text=echo + r.text,
                logprobs=lp,
                finish_reason=openai_finish_reason(r.finish_reason),
            )
        )
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
    n: int  # choices in all (n per prompt times the prompts of a completion batch)
    prompt_len: int  # prompt tokens of all prompts
    include_usage: bool
    want_logprobs: bool
    continuous_usage: bool = False  # usage so far in every chunk (stream_options.continuous_usage_stats)
    greqs: tuple[GenerateRequest, ...] = ()  # the engine requests behind the stream
    prefixes: tuple[str, ...] = ()  # per choice, text its first chunk starts with (completions' echo)
    prompt_only: bool = False  # a max_tokens 0 completion: deltas go through `without_completion`

    def usage(self, results: list[ChoiceResult]) -> UsageInfo | None:
        """The usage a content chunk carries: so far with continuous usage, else none."""
        return usage_of(self.prompt_len, results) if self.include_usage and self.continuous_usage else None

    async def abort(self, engine: EngineClient) -> None:
        await abort_all(engine, list(self.greqs))


def _error_event(d: Delta) -> bytes:
    return data_event(
        error_body(f"generation failed: {d.error or 'unknown error'}", "server_error", None, "internal_error")
    )


def _exception_event(e: Exception) -> bytes:
    """The last event of a stream whose engine request failed after the response began (a batch
    streams as soon as its prompts are queued: a refusal from the engine thread comes in the stream)."""
    if not isinstance(e, EngineError | ValueError):
        logger.error("stream failed", exc_info=e)
    return data_event(engine_error(e).body())


async def chat_stream(
    engine: EngineClient, spec: StreamSpec, first: Delta | None, it: AsyncIterator[Delta]
) -> AsyncIterator[bytes]:
    """Chat chunks: role chunk per choice, content chunks, finish chunk per choice, usage chunk, [DONE]."""
    exclude = None if spec.include_usage else {"usage"}
    results = [ChoiceResult(i) for i in range(spec.n)]

    def chunk(choice: ChatChunkChoice) -> bytes:
        c = ChatCompletionChunk(
            id=spec.rid, created=spec.created, model=spec.model, choices=[choice], usage=spec.usage(results)
        )
        return data_event(c, exclude)

    # content chunks without logprobs or running usage: by concatenation (the same bytes)
    fast = None
    if not spec.want_logprobs and spec.usage(results) is None:
        fast = ChunkTemplate.of(
            chunk(ChatChunkChoice(index=0, delta=DeltaMessage(content=ChunkTemplate.TEXT)))
        )
    finished = False
    try:
        for i in range(spec.n):
            yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
        async for d in _chain(first, it):
            results[d.index].add(d)
            if d.finish_reason == "error":
                yield _error_event(d)
                return
            if (d.text or d.logprobs) and fast is not None:
                yield fast.render(d.index, d.text)
            elif d.text or d.logprobs:
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
    except Exception as e:  # noqa: BLE001 - the engine's error, sent as the stream's last event
        yield _exception_event(e)
    finally:
        if not finished:
            await spec.abort(engine)


async def completion_stream(
    engine: EngineClient, spec: StreamSpec, deltas: AsyncIterator[Delta]
) -> AsyncIterator[bytes]:
    """Legacy completion chunks (same shape as the response), a usage chunk if asked, then [DONE].
    A chunk without usage leaves the field out: OpenAI's CreateCompletionResponse has no null usage."""

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> bytes:
        c = CompletionResponse(
            id=spec.rid, created=spec.created, model=spec.model, choices=choices, usage=usage
        )
        return data_event(c, None if usage is not None else {"usage"})

    results = [ChoiceResult(i) for i in range(spec.n)]
    echo = list(spec.prefixes)  # consumed by each choice's first chunk
    # per choice, the offsets of its generated text (which follows the echo)
    offsets = [TextOffsets(len(echo[i]) if echo else 0) for i in range(spec.n)]
    # chunks without logprobs, finish reason or running usage: by concatenation (the same bytes)
    fast = None
    if not spec.want_logprobs and spec.usage(results) is None:
        probe = CompletionChoice(index=0, text=ChunkTemplate.TEXT, logprobs=None, finish_reason=None)
        fast = ChunkTemplate.of(chunk([probe]))
    finished = False
    try:
        async for d in deltas:
            if spec.prompt_only:
                d = without_completion(d)
            results[d.index].add(d)
            if d.finish_reason == "error":
                yield _error_event(d)
                return
            prefix = ""
            if echo and echo[d.index]:
                prefix, echo[d.index] = echo[d.index], ""
            text = prefix + d.text
            lp = None
            if spec.want_logprobs:  # an echo's prompt comes first
                prompt = d.prompt_logprobs or ()
                lp = choice_logprobs(prefix, prompt, d.text, d.logprobs or (), offsets[d.index])
            reason = openai_finish_reason(d.finish_reason)
            if fast is not None and reason is None:
                yield fast.render(d.index, text)
                continue
            choice = CompletionChoice(index=d.index, text=text, logprobs=lp, finish_reason=reason)
            yield chunk([choice], spec.usage(results))
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
    except Exception as e:  # noqa: BLE001 - the engine's error, sent as the stream's last event
        yield _exception_event(e)
    finally:
        if not finished:
            await spec.abort(engine)
