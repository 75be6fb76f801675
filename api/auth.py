"""API-key authentication: `Authorization: Bearer <key>` on every path except a few open ones.

Keys come from `--api-key` (repeatable, or comma-separated) and the INFINITEVL_API_KEY environment variable
(comma-separated). Comparison is constant-time over every configured key (SHA-256 digests are compared, so
neither the key's content nor its length leaks through timing); only digests are kept in memory here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Sequence

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

API_KEY_ENV = "INFINITEVL_API_KEY"
DEFAULT_OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})

_ERROR_BODY = json.dumps(
    {
        "error": {
            "message": "Invalid or missing API key. Send 'Authorization: Bearer <key>'.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
).encode()


def api_keys_from_env_and_args(args_keys: str | Sequence[str] | None) -> list[str]:
    """Keys from the CLI (a string or list; each may be comma-separated) plus INFINITEVL_API_KEY.

    Blank entries are dropped, surrounding whitespace stripped, duplicates removed (order kept).
    """
    sources: list[str] = [args_keys] if isinstance(args_keys, str) else list(args_keys or [])
    sources.append(os.environ.get(API_KEY_ENV, ""))
    keys: list[str] = []
    for source in sources:
        for key in source.split(","):
            key = key.strip()
            if key and key not in keys:
                keys.append(key)
    return keys


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class ApiKeyMiddleware:
    """Pure ASGI middleware (keeps streaming responses untouched) enforcing bearer API keys."""

    def __init__(
        self, app: ASGIApp, api_keys: Sequence[str], open_paths: frozenset[str] = DEFAULT_OPEN_PATHS
    ):
        self.app = app
        self._digests = [_digest(k) for k in api_keys]
        self._open_paths = open_paths

    def is_authorized(self, token: str | None) -> bool:
        """Constant-time check of `token` against every key (no early exit)."""
        candidate = _digest(token or "")
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched and token is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self._digests:
            return await self.app(scope, receive, send)
        # CORS preflights (sent without credentials by design) never get here: the CORS layer outside
        # answers them (api.app.ServingApp)
        if scope["path"] in self._open_paths:
            return await self.app(scope, receive, send)
        if self.is_authorized(_bearer_token(scope["headers"])):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await _send_unauthorized(send)


async def _send_unauthorized(send: Send) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_ERROR_BODY)).encode()),
        (b"www-authenticate", b"Bearer"),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": _ERROR_BODY})


def install_auth(
    app: FastAPI, api_keys: Sequence[str], *, open_paths: frozenset[str] = DEFAULT_OPEN_PATHS
) -> None:
    """Require `Authorization: Bearer <key>` on all paths but `open_paths`; no-op when `api_keys` is empty.

    Call before the app starts serving. Rejections are 401 in the OpenAI error envelope with
    `WWW-Authenticate: Bearer`.
    """
    keys = [k for k in api_keys if k]
    if keys:
        app.add_middleware(ApiKeyMiddleware, api_keys=keys, open_paths=open_paths)
