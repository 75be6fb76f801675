"""Engine-side errors the API maps to HTTP status codes."""


class EngineError(Exception):
    """Base class."""


class EngineOverloaded(EngineError):
    """The waiting queue is full (HTTP 429 with Retry-After)."""

    def __init__(self, message: str = "server is overloaded, retry later", retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineDead(EngineError):
    """The engine thread stopped (HTTP 503)."""


class EngineDraining(EngineError):
    """The server is shutting down and accepts no new requests (HTTP 503 with Retry-After)."""


class RequestTooLarge(ValueError):
    """Prompt or max_tokens beyond the configured limits (HTTP 400)."""
