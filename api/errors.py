"""OpenAI error envelope `{"error": {"message", "type", "param", "code"}}` and the app's exception handlers.

Status mapping: 400 invalid input (never FastAPI's 422), 404 unknown model or route, 405, 413 body or item
too large, 415 non-JSON content type, 429 engine queue full (Retry-After), 503 engine dead or draining,
500 only for real faults (logged; the message carries no internals).

Codes of 400s: "invalid_value" for a wrong field value (schema errors included), "unsupported" for a
feature this server does not implement, "request_too_large" for a request over one of the server's limits,
"context_length_exceeded" for a prompt and completion over max_model_len.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import EngineDead, EngineDraining, EngineOverloaded, RequestTooLarge

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client in the OpenAI envelope."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        err_type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.err_type = err_type or _TYPE_BY_STATUS.get(status_code, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON envelope of this error."""
        return error_body(self.message, self.err_type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def error_body(
    message: str, err_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's ErrorResponse shape."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, param=param, code=code)


def invalid_value(message: str, param: str | None = None) -> APIError:
    """400 for a field whose value is wrong (code "invalid_value", as a schema error gets)."""
    return invalid_request(message, param, code="invalid_value")


def over_limit(message: str, param: str | None = None) -> APIError:
    """400 for a request over one of this server's limits (code "request_too_large", as the engine's
    own limit checks answer)."""
    return invalid_request(message, param, code="request_too_large")


def context_too_long(message: str, param: str) -> APIError:
    """400 for a prompt and completion that do not fit max_model_len (OpenAI's "context_length_exceeded")."""
    return invalid_request(message, param, code="context_length_exceeded")


def not_supported(field: str, what: str | None = None) -> APIError:
    """400 for a request feature this server does not implement."""
    return APIError(f"{what or field} is not supported by this server", 400, param=field, code="unsupported")


def model_not_found(model: str) -> APIError:
    return APIError(f"The model `{model}` does not exist.", 404, param="model", code="model_not_found")


def server_draining(retry_after: float = 5.0) -> APIError:
    seconds = str(max(1, math.ceil(retry_after)))
    return APIError(
        f"the server is shutting down; retry after {seconds} s against another replica",
        503,
        code="server_draining",
        headers={"Retry-After": seconds},
    )


def loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages.0.content'; pydantic union tags are dropped."""
    parts = [str(p) for p in loc if p != "body"]
    # pydantic adds the discriminator tag or union member name ("TextPart", "list[...]") as a location step
    parts = [p for p in parts if not (p[:1].isupper() or "[" in p or p in ("str", "int", "float", "bool"))]
    # a discriminated union repeats the tag before the field of the same name: drop the repeat
    parts = [p for i, p in enumerate(parts) if i == 0 or parts[i - 1] != p]
    return ".".join(parts) or None


def _specificity(error: dict[str, Any]) -> tuple[int, bool]:
    """How well an error tells what is wrong: the deepest location first (a union's other branches fail
    near the root); at equal depth, a broken constraint before a type mismatch, which is most often only
    the union branch the value was not meant for (`stop: [17 strings]` fails "a valid string" too)."""
    return len(error.get("loc", ())), not str(error.get("type", "")).endswith("_type")


def _same_field(other: str | None, param: str | None) -> bool:
    """True for `param` itself or a field holding it (where a union's other branch failed)."""
    return other == param or (other is not None and (param or "").startswith(other + "."))


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """Turn pydantic errors into one 400 naming the most specific offending field (`_specificity`); the
    count of further errors leaves out the other union branches of that field."""
    first = max(errors, key=_specificity) if errors else {"loc": (), "msg": "invalid request"}
    param = loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid request"))
    message = f"{param}: {msg}" if param else msg
    more = sum(
        1 for e in errors if e is not first and not _same_field(loc_to_param(tuple(e.get("loc", ()))), param)
    )
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return APIError(message, 400, param=param, code="invalid_value")


def _retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _validation(_: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
    return validation_error(list(exc.errors())).response()


async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = "Not found: no such route"
    elif exc.status_code == 405:
        message = "Method not allowed"
    else:
        message = str(exc.detail)
    return APIError(message, exc.status_code, headers=dict(exc.headers or {})).response()


def engine_error(exc: Exception, param: str | None = None) -> APIError:
    """The answer to an engine exception: what the handlers send, and what a stream that has already
    begun sends as its last event; `param`: the request field a refusal names. Anything else is an
    internal error (logged by the caller)."""
    if isinstance(exc, EngineOverloaded):
        return APIError(
            str(exc) or "server is overloaded, retry later",
            429,
            code="server_overloaded",
            headers=_retry_after_header(exc.retry_after),
        )
    if isinstance(exc, EngineDead):
        return APIError("the engine is not running", 503, code="engine_dead")
    if isinstance(exc, EngineDraining):
        return server_draining()
    if isinstance(exc, RequestTooLarge):
        return over_limit(str(exc), param)
    if isinstance(exc, ValueError):
        return invalid_value(str(exc), param)
    return APIError("internal server error", 500, code="internal_error")


async def _engine_error(_: Request, exc: Exception) -> JSONResponse:
    return engine_error(exc).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError("internal server error", 500, code="internal_error").response()


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler so that no error leaves the app outside the envelope."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    for engine_exc in (EngineOverloaded, EngineDead, EngineDraining, RequestTooLarge):
        app.add_exception_handler(engine_exc, _engine_error)
    app.add_exception_handler(Exception, _unexpected)
