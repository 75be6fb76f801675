"""HTTP server settings: one frozen dataclass built once from the command line (and environment)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field

from api import media
from api.auth import API_KEY_ENV, api_keys_from_env_and_args
from api.media import MediaLimits


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP layer needs to know; engine settings live in serving.config."""

    served_model_name: str
    model_path: str
    max_prompt_len: int = 1 << 20  # tokens per prompt, after image/video placeholder expansion
    max_model_len: int | None = None  # prompt + completion tokens; None: unbounded (recurrent model)
    default_max_tokens: int = 512  # when the request gives no max_tokens
    max_tokens_limit: int | None = 32_768  # largest max_tokens a request may ask for; None: no cap
    max_request_body_bytes: int = 64 * 2**20
    media: MediaLimits = field(default_factory=MediaLimits)
    api_keys: tuple[str, ...] = ()
    open_health_and_metrics: bool = True  # /health, /metrics, /version without a key
    allowed_local_media_path: str | None = None
    drain_retry_after_s: float = 5.0  # Retry-After sent with 503 while draining
    request_timeout_s: float | None = None  # deadline per request (seconds from arrival); None: none
    # seconds a client has to send a request's head (from connecting, or from the first byte of a later
    # request on the connection), and again its body (from the end of the head)
    request_read_timeout_s: float = 30.0
    # CORS (vLLM's --allowed-origins, --allowed-methods, --allowed-headers, --allow-credentials)
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    def __post_init__(self) -> None:
        if self.max_prompt_len < 1:
            raise ValueError("max_prompt_len must be positive")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be positive")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError("max_tokens_limit must be positive (or None: no cap)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if self.max_request_body_bytes < 1024:
            raise ValueError("max_request_body_bytes must be at least 1024")
        if self.request_timeout_s is not None and not 0 < self.request_timeout_s < float("inf"):
            raise ValueError("request_timeout_s must be a positive number of seconds")
        if not 0 < self.request_read_timeout_s < math.inf:
            raise ValueError("request_read_timeout_s must be a positive number of seconds")


def _has_option(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag in parser._option_string_actions  # argparse has no public lookup


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the HTTP layer (names follow vLLM where the meaning is the same)."""
    group = parser.add_argument_group("HTTP API")
    if not _has_option(parser, "--served-model-name"):
        group.add_argument(
            "--served-model-name", default=None, help="model name clients send (default: --model)"
        )
    group.add_argument(
        "--api-key",
        action="append",
        default=[],
        help=f"accepted bearer key (repeatable; also ${API_KEY_ENV}, comma-separated). None: no auth",
    )
    group.add_argument("--max-prompt-len", type=int, default=1 << 20, help="tokens per prompt")
    if not _has_option(parser, "--max-model-len"):
        group.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens")
    group.add_argument(
        "--default-max-tokens", type=int, default=512, help="max_tokens when a request omits it"
    )
    group.add_argument(
        "--max-tokens-limit",
        type=int,
        default=32_768,
        help="largest max_tokens a request may ask (default: 32768; 0: no cap)",
    )
    group.add_argument(
        "--max-request-bytes", type=int, default=64 * 2**20, help="largest request body in bytes"
    )
    group.add_argument(
        "--protect-health-and-metrics",
        action="store_true",
        help="require the API key on /health, /metrics and /version too",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="abort a generation this many seconds after it arrived (also caps a request's own "
        "X-Request-Timeout header or `timeout` field); default: no deadline",
    )
    group.add_argument(
        "--request-read-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a client that has not sent a request's head within this many seconds of connecting (or of "
        "the head's first byte), or its body within as many seconds after the head, gets 408 and its "
        "connection is closed (default: 30)",
    )
    add_cors_args(parser)
    add_media = getattr(media, "add_media_args", None)
    if add_media is not None:
        add_media(parser)
    if not _has_option(parser, "--allowed-local-media-path"):
        group.add_argument(
            "--allowed-local-media-path",
            default=None,
            help="directory from which file:// media may be read (default: none)",
        )


def add_cors_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's CORS flags: each a JSON list (`'["https://a.example"]'`) or a comma-separated list."""
    group = parser.add_argument_group("CORS")
    group.add_argument(
        "--allowed-origins",
        type=_list_arg,
        default=["*"],
        help='origins browsers may call from (default: ["*"])',
    )
    group.add_argument("--allowed-methods", type=_list_arg, default=["*"], help='default: ["*"]')
    group.add_argument("--allowed-headers", type=_list_arg, default=["*"], help='default: ["*"]')
    group.add_argument(
        "--allow-credentials",
        action="store_true",
        help="let browsers send cookies and HTTP auth (default: off)",
    )


def _list_arg(value: str) -> list[str]:
    """A JSON list of strings, or a comma-separated list."""
    if value.lstrip()[:1] in ("[", "{"):  # JSON (no origin, method or header name starts so)
        try:
            items = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
    else:
        items = value.split(",")
    return [i.strip() for i in items if i.strip()]


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(api_keys_from_env_and_args(getattr(args, "api_key", None)))


def _media_limits(args: argparse.Namespace) -> MediaLimits:
    from_args = getattr(media, "media_limits_from_args", None)
    if from_args is not None:
        limits = from_args(args)
    else:  # flags named after the dataclass fields
        values = vars(args)
        given = {
            f.name: values[f.name] for f in dataclasses.fields(MediaLimits) if values.get(f.name) is not None
        }
        limits = MediaLimits(**given)
    local = getattr(args, "allowed_local_media_path", None)
    if local and limits.allowed_local_media_path != local:
        limits = dataclasses.replace(limits, allowed_local_media_path=local)
    return limits


def settings_from_args(args: argparse.Namespace, *, model_path: str) -> ServerSettings:
    """Build ServerSettings from parsed flags; `model_path` is the resolved checkpoint directory or repo id."""
    served = getattr(args, "served_model_name", None)
    if isinstance(served, list | tuple):
        served = served[0] if served else None
    limits = _media_limits(args)
    return ServerSettings(
        served_model_name=served or getattr(args, "model", None) or model_path,
        model_path=model_path,
        max_prompt_len=getattr(args, "max_prompt_len", 1 << 20),
        max_model_len=getattr(args, "max_model_len", None),
        default_max_tokens=getattr(args, "default_max_tokens", 512),
        max_tokens_limit=getattr(args, "max_tokens_limit", 32_768) or None,  # 0: no cap
        max_request_body_bytes=getattr(args, "max_request_bytes", 64 * 2**20),
        media=limits,
        api_keys=_api_keys(args),
        open_health_and_metrics=not getattr(args, "protect_health_and_metrics", False),
        allowed_local_media_path=limits.allowed_local_media_path,
        request_timeout_s=getattr(args, "request_timeout", None),
        request_read_timeout_s=getattr(args, "request_read_timeout", 30.0),
        allowed_origins=tuple(getattr(args, "allowed_origins", ["*"])),
        allowed_methods=tuple(getattr(args, "allowed_methods", ["*"])),
        allowed_headers=tuple(getattr(args, "allowed_headers", ["*"])),
        allow_credentials=getattr(args, "allow_credentials", False),
    )
