"""The scheduler's view of a request: counts and slots only (no tokens, no tensors)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SchedRequest:
    """One request of `num_choices` choices. Prefill runs once on slots[0]; after the last prefill chunk the
    engine copies that state into slots[1:] and each choice decodes in its own slot."""

    request_id: str
    prompt_len: int
    max_tokens: int
    num_choices: int = 1
    status: Status = Status.WAITING
    slots: list[int] = field(default_factory=list)  # choice -> slot, assigned at admission
    num_prefilled: int = 0  # prompt tokens scheduled so far
    num_generated: list[int] = field(default_factory=list)  # per choice, tokens sampled so far
    finished: list[bool] = field(default_factory=list)  # per choice

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError("a prompt needs at least one token")
        if not self.num_generated:
            self.num_generated = [0] * self.num_choices
        if not self.finished:
            self.finished = [False] * self.num_choices

    @property
    def is_prefilling(self) -> bool:
        return self.num_prefilled < self.prompt_len

    @property
    def live_choices(self) -> list[int]:
        if self.num_choices == 1:  # the common case, once per request per step
            return [] if self.finished[0] else [0]
        return [c for c in range(self.num_choices) if not self.finished[c]]


class ScheduledRow(NamedTuple):
    """One sequence of a step: `num_tokens` new tokens starting at absolute index `start` of its sequence.

    A named tuple: the scheduler makes one per running choice per step, and a frozen dataclass costs
    about three times as much to construct."""

    request_id: str
    slot: int
    start: int
    num_tokens: int
    choice: int  # decode: the choice this row advances; prefill: 0
    is_prefill: bool
    is_sampled: bool  # logits of the row's last token are sampled this step
    fork_to: tuple[int, ...] = ()  # after this step, copy `slot`'s state into these slots (n > 1)


@dataclass(frozen=True)
class ScheduledBatch:
    rows: tuple[ScheduledRow, ...]

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    @property
    def is_empty(self) -> bool:
        return not self.rows

    @cached_property  # asked by the engine and the runner several times a step; rows never change
    def is_decode_only(self) -> bool:
        return all(not r.is_prefill and r.num_tokens == 1 for r in self.rows)
