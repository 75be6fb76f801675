"""Offline entry: generate for a list of prompts on the calling thread (tests and benchmarks)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from serving.build import build_engine
from serving.config import EngineConfig
from serving.types import Delta, GenerateRequest, SamplingParams


@dataclass
class ChoiceOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[Any] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    choices: list[ChoiceOutput]
    error: str | None = None


@dataclass
class Prompt:
    """A chat (list of messages with optional PIL images / VideoInput items) or a plain text prompt."""

    messages: list[dict] | None = None
    text: str | None = None
    images: Sequence[Any] = ()
    videos: Sequence[Any] = ()


class LLM:
    """Synchronous generation over the same engine core the server uses."""

    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **engine_kwargs)
        self.stack = build_engine(self.config)
        self.core = self.stack.core
        self.processor = self.stack.processor
        self._ids = itertools.count()

    def make_request(self, prompt: Prompt | str | list[int], params: SamplingParams) -> GenerateRequest:
        """Tokenise a prompt (chat messages with media, text, or token ids) into an engine request."""
        if isinstance(prompt, str):
            prompt = Prompt(text=prompt)
        if isinstance(prompt, list):
            processed = token_id_prompt(prompt)
        else:
            text = prompt.text
            if prompt.messages is not None:
                text = self.processor.apply_chat_template(prompt.messages, add_generation_prompt=True)
            processed = self.processor.process(text, list(prompt.images), list(prompt.videos))
        return GenerateRequest(
            request_id=f"offline-{next(self._ids)}",
            prompt_token_ids=processed.input_ids,
            positions=processed.positions,
            rope_delta=processed.rope_delta,
            sampling=params,
            mm=processed.mm,
        )

    def generate(
        self,
        prompts: Sequence[Prompt | str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    ) -> list[RequestOutput]:
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        reqs = [self.make_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        return self.run_requests(reqs)

    def run_requests(
        self, reqs: Sequence[GenerateRequest], arrival_steps: Sequence[int] | None = None
    ) -> list[RequestOutput]:
        """Run requests to completion; request i is added before engine step arrival_steps[i] (default 0)."""
        outs = {r.request_id: RequestOutput(r.request_id, r.prompt_token_ids, []) for r in reqs}
        for r in reqs:
            outs[r.request_id].choices = [ChoiceOutput(i) for i in range(r.sampling.n)]
        arrivals = list(arrival_steps) if arrival_steps is not None else [0] * len(reqs)
        pending = sorted(range(len(reqs)), key=lambda i: arrivals[i])
        step = 0
        while pending or self.core.scheduler.has_work():
            while pending and arrivals[pending[0]] <= step:
                r = reqs[pending.pop(0)]
                self.core.validate(r)
                self.core.add(r, lambda d, o=outs[r.request_id]: _collect(o, d))
            self.core.step()
            step += 1
        return [outs[r.request_id] for r in reqs]


def token_id_prompt(ids: list[int]) -> Any:
    """A pre-tokenised text prompt: positions 0..n-1 on all three axes."""
    from model.positions import continuation_positions
    from model.processor import ProcessedPrompt

    return ProcessedPrompt(list(ids), continuation_positions(0, len(ids), 0), 0, None)


def _collect(out: RequestOutput, d: Delta) -> None:
    ch = out.choices[d.index]
    ch.text += d.text
    ch.token_ids.extend(d.token_ids)
    if d.logprobs:
        ch.logprobs.extend(d.logprobs)
    if d.finish_reason is not None:
        ch.finish_reason = d.finish_reason
        ch.stop_reason = d.stop_reason
        if d.error:
            out.error = d.error


def greedy(max_tokens: int = 16, **kw: Any) -> SamplingParams:
    return replace(SamplingParams(temperature=0.0, max_tokens=max_tokens), **kw)
