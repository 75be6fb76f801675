"""The engine thread's record of one live request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from scheduler import SchedRequest
from serving.sampler import SamplingRow
from serving.stop import ChoiceDecoder
from serving.types import Delta, GenerateRequest, LogprobEntry, RequestStats


@dataclass
class VisionCache:
    """Merged vision features of one request, computed once and sliced across prefill chunks.

    features[k] is the feature of the k-th image (or video) pad token of the prompt, on the model device."""

    image_features: torch.Tensor | None = None  # [num_image_pad_tokens, hidden]
    video_features: torch.Tensor | None = None  # [num_video_pad_tokens, hidden]
    image_prefix: torch.Tensor | None = None  # [prompt_len + 1] int64 CPU: image pads before index i
    video_prefix: torch.Tensor | None = None


@dataclass
class EngineRequest:
    req: GenerateRequest
    sched: SchedRequest
    rows: list[SamplingRow]  # one per choice
    decoders: list[ChoiceDecoder]  # one per choice
    stats: RequestStats
    emit: Callable[[Delta], None]  # hands a delta to the API side (thread-safe)
    vision: VisionCache | None = None
    prompt_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))  # CPU
    # prompt_logprobs: (token id, logprob, top-k [(id, logprob)]) of prompt tokens 1.., filled by the
    # runner chunk by chunk during prefill
    prompt_scores: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_logprob_entries: tuple[LogprobEntry, ...] | None = None  # made from them at the first delta

    @property
    def request_id(self) -> str:
        return self.req.request_id
