"""Records exchanged between the API layer and the engine (plain dataclasses, no HTTP)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# a temperature below this samples greedily (vLLM's _SAMPLING_EPS): dividing float32 logits by a smaller
# one, down to the 1e-45 the API accepts as positive, gives infinite scores and no distribution at all
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; validated by `validate()` (raises ValueError naming the field)."""

    max_tokens: int = 16
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token plus top-k alternatives
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's logprob plus top-k
    skip_special_tokens: bool = True

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 (disabled) or positive")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError("presence_penalty must be between -2 and 2")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("frequency_penalty must be between -2 and 2")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError("repetition_penalty must be in (0, 2]")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("top_logprobs must be between 0 and 20")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError("prompt_logprobs must be between 0 and 20")
        if vocab_size is not None:
            for tid in list(self.stop_token_ids) + list((self.logit_bias or {}).keys()):
                if not 0 <= tid < vocab_size:
                    raise ValueError(f"token id {tid} is outside the vocabulary (0..{vocab_size - 1})")
        for b in (self.logit_bias or {}).values():
            if not -100.0 <= b <= 100.0:
                raise ValueError("logit_bias values must be between -100 and 100")


@dataclass
class MultiModalInputs:
    """Processor outputs for the images and videos of one prompt (CPU tensors)."""

    pixel_values: torch.Tensor | None = None  # [num_image_patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None = None  # [num_images, 3] int64
    pixel_values_videos: torch.Tensor | None = None  # [num_video_patches, C*T*P*P]
    video_grid_thw: torch.Tensor | None = None  # [num_videos, 3] int64
    second_per_grid_ts: list[float] | None = None  # one per video

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    @property
    def num_videos(self) -> int:
        return 0 if self.video_grid_thw is None else int(self.video_grid_thw.shape[0])


@dataclass
class GenerateRequest:
    """A tokenised prompt ready for the engine."""

    request_id: str
    prompt_token_ids: list[int]
    positions: torch.Tensor  # [3, prompt_len] int64 M-RoPE positions of the whole prompt
    rope_delta: int  # continuation: token at absolute index i gets position i + rope_delta
    sampling: SamplingParams
    mm: MultiModalInputs | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic time after which the request is aborted (finish "timeout")


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: list[int] | None = None


@dataclass(frozen=True)
class LogprobEntry:
    """Logprob of one generated token and its top alternatives."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """What one choice of a request produced since its last delta.

    The final delta of a choice has `finish_reason` set ("stop", "length", "abort", "error",
    "timeout"); `usage` is set on it with that choice's completion tokens. `error` carries a message
    when finish_reason is "error".
    """

    request_id: str
    index: int  # choice index (n > 1)
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[LogprobEntry, ...] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    usage: Usage | None = None
    error: str | None = None
    # with SamplingParams.prompt_logprobs, on the first delta of each choice: one entry per prompt token,
    # the first with logprob NaN and no alternatives (no token precedes it to predict it)
    prompt_logprobs: tuple[LogprobEntry, ...] | None = None


@dataclass(frozen=True)
class EngineHealth:
    is_ready: bool
    is_alive: bool  # False once the engine thread has died
    is_draining: bool
    detail: str = ""


@dataclass
class RequestStats:
    """Timestamps (time.monotonic seconds) and counts of one finished request, for metrics."""

    arrival_time: float
    scheduled_time: float | None = None  # admitted into a slot
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    prefill_done_time: float | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finish_reason: str = ""
    n: int = 1
    max_tokens: int = 0
    # seconds between consecutive tokens of one choice
    token_intervals: list[float] = field(default_factory=list)
    choice_last_token_time: dict[int, float] = field(default_factory=dict)  # by choice index
    longest_choice_tokens: int = 0  # tokens of the choice that generated most (n > 1: per-choice pace)


class EngineClient(Protocol):
    """The narrow engine interface the API depends on."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        """Queue a request; iterate its deltas until every choice has finished.
        Raises `serving.errors.EngineOverloaded` at once if the waiting queue is full,
        `serving.errors.EngineDead` if the engine is not running, ValueError for an invalid request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def health(self) -> EngineHealth: ...

    def info(self) -> dict[str, Any]:
        """Static facts for /version and metrics labels (model name, backend, dtypes, slots)."""
        ...
