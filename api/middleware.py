"""ASGI middleware around the API app (`api.app.ServingApp` wires them): the Gate in front of the routes
counts in-flight requests (`app.state.in_flight`, awaited by the CLI on shutdown), refuses new POSTs while
`app.state.draining` is set, caps request bodies and the time to receive them, and records per-route HTTP
metrics; `RequestId` puts `x-request-id` on every response; `Cors` answers preflights in the OpenAI error
envelope when it refuses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware

from api.errors import (
    APIError,
    server_draining,
)
from api.settings import ServerSettings

# status of a refused POST -> `reason` label of infinitevl:requests_rejected_total (503 counts only while
# draining: a dead engine is not a rejection of the request)
REJECT_REASON_BY_STATUS = {
    400: "invalid", 404: "invalid", 408: "invalid", 413: "invalid", 415: "invalid", 429: "overloaded",
}  # fmt: skip
# a request answered before its whole body arrived closes its connection (the rest is never read)
CONNECTION_CLOSE = (b"connection", b"close")
DRAIN_CHECK_S = 0.2  # how often a request still receiving its body looks whether a drain began
# a body's deadline moves on by its bytes at this rate (bytes/s): a large body on a slow but steady link
# arrives, while one trickled a few bytes at a time is still cut at about --request-read-timeout
MIN_BODY_RATE = 64 * 1024


# ---- the ASGI gate -------------------------------------------------------------------------------------


class Gate:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would break disconnect detection and streaming)."""

    def __init__(self, app: Any, fastapi_app: FastAPI, settings: ServerSettings, metrics: Any):
        self.app = app
        self.state = fastapi_app.state
        self.limit = settings.max_request_body_bytes
        self.read_timeout = settings.request_read_timeout_s
        self.retry_after = settings.drain_retry_after_s
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status = [500]
        recorded = [False]
        body = _Body(is_complete=not _has_body(scope))

        async def send_recording(message: dict[str, Any]) -> None:
            # metrics are recorded before the client can see the answer (a scrape that follows it sees them)
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                self._record_rejection(scope["method"], status[0])
                if not body.is_complete:  # answered before its body came: the rest is not worth reading
                    message = {**message, "headers": [*message.get("headers", ()), CONNECTION_CLOSE]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                recorded[0] = True
                self._record(scope, status[0], time.monotonic() - t0)
            await send(message)

        self.state.in_flight += 1
        try:
            early = self._early_rejection(scope)
            if early is not None:
                await early(scope, receive, send_recording)
            else:
                await self.app(scope, self._reading(receive, body), send_recording)
        finally:
            self.state.in_flight -= 1
            if not recorded[0]:  # the response never completed (client gone, or an error)
                self._record(scope, status[0], time.monotonic() - t0)

    def _early_rejection(self, scope: dict[str, Any]) -> Response | None:
        if scope["method"] == "POST" and getattr(self.state, "draining", False):
            return server_draining(self.retry_after).response()
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return _body_too_large(self.limit).response()
        return None

    def _reading(self, receive: Any, body: _Body) -> Any:
        """`receive` for the app: the body counted against the size limit and read within the read timeout
        from now (the end of the request head) plus its size at MIN_BODY_RATE; once it is complete,
        messages pass unbounded (a stream waits on them for a disconnect)."""
        start = time.monotonic() + self.read_timeout

        async def read() -> dict[str, Any]:
            if body.is_complete:
                return await receive()
            message = await self._receive_by(receive, start + body.num_bytes / MIN_BODY_RATE)
            if message["type"] != "http.request":  # a disconnect
                body.is_complete = True
                return message
            body.num_bytes += len(message.get("body", b""))
            if body.num_bytes > self.limit:
                raise _body_too_large(self.limit)
            body.is_complete = not message.get("more_body", False)
            return message

        return read

    async def _receive_by(self, receive: Any, deadline: float) -> dict[str, Any]:
        """One message of a body still coming in: 408 past `deadline`; 503 once a drain begins (a request
        still uploading has not started, and a stalled upload must not hold the drain up)."""
        while True:
            if getattr(self.state, "draining", False):
                raise server_draining(self.retry_after)
            left = deadline - time.monotonic()
            if left <= 0:
                raise _read_timeout(self.read_timeout)
            with contextlib.suppress(TimeoutError):  # uvicorn's receive() may be cancelled and called again
                async with asyncio.timeout(min(left, DRAIN_CHECK_S)):
                    return await receive()

    def _record(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        if self.metrics is None:
            return
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        with contextlib.suppress(Exception):  # metrics must never fail a request
            self.metrics.on_http(path, scope["method"], status, seconds)

    def _record_rejection(self, method: str, status: int) -> None:
        reason = self._reject_reason(method, status)
        if self.metrics is not None and reason is not None:
            with contextlib.suppress(Exception):
                self.metrics.on_request_rejected(reason)

    def _reject_reason(self, method: str, status: int) -> str | None:
        if method != "POST":
            return None
        if status == 503:
            return "draining" if getattr(self.state, "draining", False) else None
        return REJECT_REASON_BY_STATUS.get(status)


@dataclass
class _Body:
    """How much of one request's body the app has received."""

    is_complete: bool  # the last chunk (or a disconnect) was received; True from the start without a body
    num_bytes: int = 0


def _has_body(scope: dict[str, Any]) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


def _body_too_large(limit: int) -> APIError:
    return APIError(f"request body is larger than the limit of {limit} bytes", 413, code="request_too_large")


def _read_timeout(seconds: float) -> APIError:
    return APIError(
        f"the request body was not received within {seconds:g} s",
        408,
        code="request_read_timeout",
        err_type="timeout_error",
    )


# ---- request ids and CORS, outside everything else ------------------------------------------------------

REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")  # visible ASCII, as a log line or header can hold


def request_id_of(headers: Any) -> str:
    """The client's X-Request-Id when it is 1-128 visible ASCII characters, else a new random one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _VALID_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class RequestId:
    """Pure ASGI middleware: every HTTP response carries `x-request-id`, the client's or a new one
    (`request_id_of`); routes find it in `request.state.request_id`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope["headers"])
        scope.setdefault("state", {})["request_id"] = rid
        header = (REQUEST_ID_HEADER, rid.encode("ascii"))

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class Cors(CORSMiddleware):
    """Starlette's CORS middleware; a refused preflight is a 400 in the OpenAI error envelope."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        cors_headers = {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        return APIError(
            f"this cross-origin request is not allowed (refused: {refused}); see --allowed-origins, "
            "--allowed-methods and --allowed-headers",
            400,
            code="cors_refused",
            headers={**cors_headers, "Vary": response.headers.get("vary", "Origin")},
        ).response()
