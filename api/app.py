"""The FastAPI application: routes of the OpenAI-compatible API plus health, version, tokenizer and metrics.

Route functions only parse, delegate and answer: validation and prompt building live in `api.chat`, media
loading in `api.media`, response assembly in `api.responses`, the ASGI middleware (the Gate in front of the
routes; CORS and `x-request-id` around everything, wired by `ServingApp`) in `api.middleware`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from importlib import metadata
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from api.chat import (
    TIMEOUT_FIELD,
    TIMEOUT_HEADER,
    TemplateOptions,
    build_sampling,
    check_model,
    check_prompt_len,
    make_generate_request,
    new_id,
    now_s,
    param_of,
    prepare_chat,
    prepare_completion,
    reject_unsupported_chat,
    reject_unsupported_completion,
    request_timeout,
    split_prompts,
)
from api.errors import (
    APIError,
    engine_error,
    install_error_handlers,
    invalid_request,
    validation_error,
)
from api.middleware import Cors, Gate, RequestId
from api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from api.responses import (
    Started,
    StreamSpec,
    abort_all,
    chat_response,
    chat_stream,
    collect,
    collect_all,
    completion_response,
    completion_stream,
    deltas_of,
    merged,
    start_all,
    submit_all,
)
from api.settings import ServerSettings
from api.sse import sse_response
from serving.types import Delta, EngineClient, GenerateRequest

M = TypeVar("M", bound=BaseModel)
JSON_TYPES = ("application/json",)


def package_version() -> str:
    try:
        from serving.version import __version__

        return __version__
    except ImportError:
        pass
    try:
        return metadata.version("infinitevl-serve")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


class ServingApp(FastAPI):
    """The FastAPI app with `RequestId` and CORS wrapped around Starlette's whole stack, so that even the
    500s of its outermost error middleware carry them. Order, outermost first: RequestId, Cors, Starlette's
    error middleware, Gate, API keys, routes. CORS answers preflights before the API key is asked for
    (browsers send none) and before the Gate (a preflight is not a request in flight, nor in the HTTP
    metrics); the Gate's own answers (413, 503 while draining) and the 401s carry CORS headers."""

    def build_middleware_stack(self) -> Any:
        settings: ServerSettings = self.state.settings
        cors = Cors(
            super().build_middleware_stack(),
            allow_origins=settings.allowed_origins,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
            allow_credentials=settings.allow_credentials,
            expose_headers=("x-request-id", "retry-after"),
        )
        return RequestId(cors)


# ---- body parsing --------------------------------------------------------------------------------------


async def read_json(request: Request, model: type[M]) -> M:
    """Parse the body as `model`: 415 for a non-JSON content type, 400 for bad JSON or invalid fields."""
    return (await read_json_raw(request, model))[0]


async def read_json_raw(request: Request, model: type[M]) -> tuple[M, dict[str, Any]]:
    """`read_json`, also returning the raw JSON object (for extra fields the model ignores)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype not in JSON_TYPES and not ctype.endswith("+json"):
        raise APIError(
            f"unsupported content type `{ctype}`: send JSON with `Content-Type: application/json`",
            415,
            code="unsupported_media_type",
        )
    body = await request.body()
    if not body.strip():
        raise invalid_request("the request body is empty; a JSON object is required")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise invalid_request("the request body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise invalid_request("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(obj):
        raise invalid_request(
            "the request body contains an unpaired UTF-16 surrogate (a \\uD800-\\uDFFF escape)"
        )
    try:
        return model.model_validate(obj), obj
    except ValidationError as e:
        raise validation_error(list(e.errors())) from None


# a \uD800-\uDFFF escape; JSON allows unpaired ones, which no UTF-8 text (tokenizer, response) can hold
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(obj: Any) -> bool:
    """True if any string (key or value) in the parsed JSON holds an unpaired surrogate."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _json(model: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status)


# ---- app -----------------------------------------------------------------------------------------------


def create_app(
    engine: EngineClient, processor: Any, settings: ServerSettings, metrics: Any = None
) -> FastAPI:
    """Build the app around a running engine, the model's processor and the server settings."""
    app = ServingApp(title="InfiniteVL OpenAI-compatible server", version=package_version())
    app.state.engine = engine
    app.state.settings = settings
    app.state.draining = False
    app.state.in_flight = 0
    app.state.started_at = now_s()
    install_error_handlers(app)
    _install_auth(app, settings)
    app.add_middleware(Gate, fastapi_app=app, settings=settings, metrics=metrics)
    _add_generation_routes(app, engine, processor, settings)
    _add_info_routes(app, engine, settings, metrics)
    _add_tokenizer_routes(app, engine, processor, settings)
    _declare_request_bodies(app)
    return app


class TokenizeBody(TokenizeRequest):
    """POST /tokenize as vLLM takes it: `TokenizeRequest` plus the chat form's `add_generation_prompt`
    (false: the tokens end with the last message, without the assistant header) and
    `continue_final_message` (continue the final assistant message), and `return_token_strs` (the tokens' strings in
    `token_strs`). `add_special_tokens` puts the tokenizer's own special tokens (a BOS ...) around the
    prompt's; off by default, as the generation endpoints tokenize."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


# POST routes read raw JSON (to answer OpenAI-style 400s, never FastAPI's 422s), so FastAPI cannot see
# their bodies; they are declared here from the pydantic models the routes validate against.
REQUEST_BODIES = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/tokenize": TokenizeBody,
    "/detokenize": DetokenizeRequest,
}


def _declare_request_bodies(app: FastAPI) -> None:
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            models = [(m, "validation") for m in REQUEST_BODIES.values()]
            refs, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            for path, model in REQUEST_BODIES.items():
                doc["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": refs[(model, "validation")]}},
                }
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_auth(app: FastAPI, settings: ServerSettings) -> None:
    if not settings.api_keys:
        return
    from api.auth import DEFAULT_OPEN_PATHS, install_auth

    open_paths = DEFAULT_OPEN_PATHS if settings.open_health_and_metrics else frozenset()
    install_auth(app, list(settings.api_keys), open_paths=open_paths)


def _vocab_size(engine: EngineClient) -> int | None:
    """The model's vocabulary size: engine.info()["vocab_size"], else (AsyncEngine, whose info the CLI
    fills without it) read from the engine core's model config; None when neither is known."""
    size = engine.info().get("vocab_size")
    if isinstance(size, int):
        return size
    try:
        size = engine.core.runner.model.config.text.vocab_size  # type: ignore[attr-defined]
    except AttributeError:
        return None
    return size if isinstance(size, int) else None


async def _submit(engine: EngineClient, greq: GenerateRequest, request: Request) -> Any:
    """`_submit_all` for one request: (its deltas, the first delta)."""
    (started,) = await _submit_all(engine, [greq], request)
    return started.it, started.first


async def _submit_all(engine: EngineClient, greqs: list[GenerateRequest], request: Request) -> list[Started]:
    """Submit the requests (one, or a completion batch's) and wait for their first deltas: all of them
    or none (start_all aborts the rest when one is refused); the engine's ValueError is a 400, a
    deadline passed before any token a 504."""
    try:
        started = await start_all(engine, greqs, request)
    except ValueError as e:  # the engine's own validation
        raise _engine_invalid(e) from e
    timed_out = next((s.first for s in started if _timed_out(s.first)), None)
    if timed_out is not None:
        await abort_all(engine, greqs)
        _raise_if_timed_out(timed_out)
    return started


async def _queue_all(engine: EngineClient, greqs: list[GenerateRequest]) -> list[AsyncIterator[Delta]]:
    """Submit the requests of a streamed batch without waiting for any delta: all of them or none, a
    refusal answered as by `_submit_all`; what the engine reports later comes in the stream."""
    try:
        return await submit_all(engine, greqs)
    except ValueError as e:
        raise _engine_invalid(e) from e


def _engine_invalid(e: ValueError) -> APIError:
    """400 for a request the engine refused as invalid (`engine_error`), naming the field its message
    starts with."""
    return engine_error(e, param_of(str(e)))


async def _echo_prefixes(prompts: list[str | list[int]], n: int, processor: Any) -> tuple[str, ...]:
    """Per choice (n per prompt), the prompt's text: the string itself, or its token ids decoded."""
    texts = []
    for p in prompts:
        texts.append(p if isinstance(p, str) else await asyncio.to_thread(processor.tokenizer.decode, p))
    return tuple(t for t in texts for _ in range(n))


def _timed_out(first: Delta | None) -> bool:
    return first is not None and first.finish_reason == "timeout" and not first.token_ids


def _raise_if_timed_out(first: Delta | None) -> None:
    """504 when the deadline passed before any token: the first delta of all is a "timeout" final.
    (Once a token exists the answer is the partial one, finish_reason "length"; see docs/security.md.)"""
    if _timed_out(first):
        raise APIError(
            "the request exceeded its deadline before any token was generated",
            504,
            code="request_timeout",
            err_type="timeout_error",
        )


def _deadline(
    request: Request, raw: dict[str, Any], settings: ServerSettings, arrival: float
) -> float | None:
    """Monotonic deadline of this request (arrival + its timeout), or None."""
    timeout = request_timeout(request.headers.get(TIMEOUT_HEADER), raw.get(TIMEOUT_FIELD), settings)
    return None if timeout is None else arrival + timeout


def _add_generation_routes(
    app: FastAPI, engine: EngineClient, processor: Any, settings: ServerSettings
) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        req, raw = await read_json_raw(request, ChatCompletionRequest)
        check_model(req.model, settings)
        deadline = _deadline(request, raw, settings, arrival)
        reject_unsupported_chat(req)
        options = TemplateOptions(req.add_generation_prompt, req.continue_final_message)
        prompt = await prepare_chat(req.messages, processor, settings, options)
        prompt_len = len(prompt.input_ids)
        check_prompt_len(prompt_len, settings, "messages")
        sampling = build_sampling(req, prompt_len, settings, _vocab_size(engine))
        rid, created = new_id("chatcmpl"), now_s()
        greq = make_generate_request(rid, prompt, sampling, deadline)
        it, first = await _submit(engine, greq, request)
        opts = req.stream_options
        if req.stream:
            spec = StreamSpec(
                rid, created, req.model, req.n, prompt_len, include_usage=bool(opts and opts.include_usage),
                want_logprobs=req.logprobs, continuous_usage=bool(opts and opts.continuous_usage_stats),
                greqs=(greq,),
            )  # fmt: skip
            return sse_response(chat_stream(engine, spec, first, it))
        results = await collect(engine, greq, request, first, it)
        return _json(chat_response(rid, created, req.model, prompt_len, results, req.logprobs))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        req, raw = await read_json_raw(request, CompletionRequest)
        check_model(req.model, settings)
        deadline = _deadline(request, raw, settings, arrival)
        reject_unsupported_completion(req)
        prompts = split_prompts(req.prompt)
        vocab = _vocab_size(engine)
        rid, created = new_id("cmpl"), now_s()
        greqs = []
        for i, text_or_ids in enumerate(prompts):  # every prompt checked before any is submitted
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            prompt = await prepare_completion(
                text_or_ids, processor, vocab_size=vocab, param=param, max_prompt_len=settings.max_prompt_len
            )
            check_prompt_len(len(prompt.input_ids), settings, param)
            sampling = build_sampling(req, len(prompt.input_ids), settings, vocab, prompt_param=param)
            if req.echo and req.logprobs is not None:  # the echoed prompt's logprobs too (scoring)
                sampling = replace(sampling, prompt_logprobs=req.logprobs)
            # one engine request per prompt; a batch's ids say which prompt they serve
            request_id = rid if len(prompts) == 1 else f"{rid}-{i}"
            greqs.append(make_generate_request(request_id, prompt, sampling, deadline))
        prompt_len = sum(len(g.prompt_token_ids) for g in greqs)
        prefixes = await _echo_prefixes(prompts, req.n, processor) if req.echo else ()
        want_logprobs = req.logprobs is not None
        if not req.stream:
            started = await _submit_all(engine, greqs, request)
            results = await collect_all(engine, started, request, prompt_only=req.max_tokens == 0)
            return _json(
                completion_response(rid, created, req.model, prompt_len, results, want_logprobs, prefixes)
            )
        opts = req.stream_options
        spec = StreamSpec(
            rid, created, req.model, req.n * len(prompts), prompt_len,
            include_usage=bool(opts and opts.include_usage), want_logprobs=want_logprobs,
            continuous_usage=bool(opts and opts.continuous_usage_stats),
            greqs=tuple(greqs), prefixes=prefixes, prompt_only=req.max_tokens == 0,
        )  # fmt: skip
        if len(greqs) == 1:
            (started,) = await _submit_all(engine, greqs, request)
            streams = [deltas_of(started)]
        else:  # a batch streams once all its prompts are queued: their first tokens come at different times
            streams = await _queue_all(engine, greqs)
        return sse_response(completion_stream(engine, spec, merged(streams, req.n)))


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    plain = (str, int, float, bool, type(None))
    return {str(k): v if isinstance(v, plain) else str(v) for k, v in info.items()}


def _add_info_routes(app: FastAPI, engine: EngineClient, settings: ServerSettings, metrics: Any) -> None:
    def card() -> ModelCard:
        return ModelCard(
            id=settings.served_model_name,
            created=app.state.started_at,
            root=settings.model_path,
            max_model_len=settings.max_model_len,
        )

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _json(ModelList(data=[card()]))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        check_model(model_id, settings)
        return _json(card())

    @app.get("/health")
    async def health() -> Response:
        h = engine.health()
        if app.state.draining or h.is_draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "5"})
        if not h.is_alive:
            return JSONResponse({"status": "dead", "detail": h.detail}, status_code=503)
        if not h.is_ready:
            return JSONResponse({"status": "starting", "detail": h.detail}, status_code=503)
        return JSONResponse({"status": "ok"})

    # HEAD (load balancers' probes): the GET's status and headers; uvicorn sends no body
    for path, endpoint in (
        ("/health", health),
        ("/v1/models", list_models),
        ("/v1/models/{model_id:path}", get_model),
    ):
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse(
            {
                "version": package_version(),
                "served_model_name": settings.served_model_name,
                **_engine_info(engine),
            }
        )

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        if metrics is None:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
        body, content_type = metrics.render()
        return Response(body, headers={"Content-Type": content_type})


def _engine_info(engine: EngineClient) -> dict[str, Any]:
    try:
        return {"engine": _jsonable(engine.info())}
    except Exception:
        return {}


_SPECIAL_TOKENS_PROBE = "a"


def with_special_tokens(tokenizer: Any, ids: list[int]) -> list[int]:
    """`ids` inside the special tokens the tokenizer adds around a text (none, a BOS, BOS and EOS ...),
    found by encoding a probe text with and without them."""
    plain = tokenizer.encode(_SPECIAL_TOKENS_PROBE, add_special_tokens=False)
    full = tokenizer.encode(_SPECIAL_TOKENS_PROBE, add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return [*full[:start], *ids, *full[start + len(plain) :]]
    return list(ids)


async def _token_ids(req: TokenizeBody, processor: Any, settings: ServerSettings) -> list[int]:
    """The tokens of a /tokenize request's prompt as the generation endpoints see them (an empty text
    has none, as in vLLM)."""
    if (req.prompt is None) == (req.messages is None):
        raise invalid_request("give exactly one of `prompt` and `messages`", "prompt")
    if req.messages is not None:
        if not req.messages:
            raise invalid_request("messages must not be empty", "messages")
        options = TemplateOptions(req.add_generation_prompt, req.continue_final_message)
        return (await prepare_chat(req.messages, processor, settings, options)).input_ids
    if not req.prompt:
        return []
    return (await prepare_completion(req.prompt, processor, max_prompt_len=settings.max_prompt_len)).input_ids


def _add_tokenizer_routes(
    app: FastAPI, engine: EngineClient, processor: Any, settings: ServerSettings
) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = await read_json(request, TokenizeBody)
        if req.model is not None:
            check_model(req.model, settings)
        ids = await _token_ids(req, processor, settings)
        if req.add_special_tokens:
            ids = with_special_tokens(processor.tokenizer, ids)
        strs = None
        if req.return_token_strs:
            strs = await asyncio.to_thread(processor.tokenizer.convert_ids_to_tokens, ids)
        return JSONResponse(
            {"count": len(ids), "max_model_len": settings.max_model_len, "tokens": ids, "token_strs": strs}
        )

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = await read_json(request, DetokenizeRequest)
        if req.model is not None:
            check_model(req.model, settings)
        vocab = _vocab_size(engine)
        bad = [t for t in req.tokens if vocab is not None and t >= vocab]
        if bad:
            raise invalid_request(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "tokens")
        try:
            text = await asyncio.to_thread(processor.tokenizer.decode, req.tokens)
        except (ValueError, TypeError, IndexError, OverflowError) as e:
            raise invalid_request(f"cannot decode these tokens: {e}", "tokens") from None
        return JSONResponse({"prompt": text})
