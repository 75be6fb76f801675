"""First-come-first-served continuous batching with chunked prefill under a per-step token budget.

Every step, each running choice that has finished prefill gets one decode token first (so inter-token latency
stays bounded), then the remaining budget goes to prefill chunks in arrival order; waiting requests are admitted
in strict FIFO order when enough slots are free for all their choices. Prefills under way take at most half
of the budget while a request could be admitted, so a long prompt does not keep arrivals waiting for its
whole prefill; among them the fewest tokens left go first, the oldest being sure of an equal share (no
prompt starves). What the arrivals leave goes back to them. Admission is only "are slots free": memory per
request is constant, so nothing is ever preempted.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.request import SchedRequest, ScheduledBatch, ScheduledRow, Status


class QueueFull(Exception):
    """The waiting queue holds `max_waiting` requests already."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # slots in the pool
    max_num_batched_tokens: int  # token budget of one step
    max_waiting: int = 1024  # bounded waiting queue (beyond it: QueueFull -> HTTP 429)
    max_prefill_chunk: int | None = None  # cap one prefill chunk below the budget (None: the budget)

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                "max_num_batched_tokens must be at least max_num_seqs (one decode token per slot)"
            )


class Scheduler:
    """Works on ints only; `allocate_slot`/`free_slot`/`num_free_slots` come from the slot pool."""

    def __init__(
        self,
        config: SchedulerConfig,
        allocate_slot: Callable[[], int],
        free_slot: Callable[[int], None],
        num_free_slots: Callable[[], int],
    ) -> None:
        self.config = config
        self._allocate = allocate_slot
        self._free = free_slot
        self._num_free = num_free_slots
        self.waiting: deque[SchedRequest] = deque()
        self.running: OrderedDict[str, SchedRequest] = OrderedDict()  # admission order

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: SchedRequest) -> None:
        if req.num_choices > self.config.max_num_seqs:
            raise ValueError(
                f"n={req.num_choices} exceeds the {self.config.max_num_seqs} slots of this server"
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting")
        req.status = Status.WAITING
        self.waiting.append(req)

    def get(self, request_id: str) -> SchedRequest | None:
        if request_id in self.running:
            return self.running[request_id]
        return next((r for r in self.waiting if r.request_id == request_id), None)

    def abort(self, request_id: str) -> SchedRequest | None:
        """Remove a request wherever it is and free its slots; None if unknown or already finished."""
        req = self.running.pop(request_id, None)
        if req is None:
            for r in self.waiting:
                if r.request_id == request_id:
                    self.waiting.remove(r)
                    req = r
                    break
        if req is None:
            return None
        self._release(req)
        return req

    def finish_choice(self, request_id: str, choice: int) -> bool:
        """Mark one choice done and free its slot; returns True when the whole request is finished."""
        req = self.running[request_id]
        if req.finished[choice]:
            return not req.live_choices
        req.finished[choice] = True
        self._free_choice_slot(req, choice)
        if not req.live_choices:
            self.running.pop(request_id)
            self._release(req)
            return True
        return False

    def schedule(self) -> ScheduledBatch:
        """Form the next step. Counters advance here: a scheduled token counts as computed."""
        budget = self.config.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        for req in self.running.values():
            if req.is_prefilling:
                continue
            for c in req.live_choices:
                if budget == 0:
                    break
                if req.num_generated[c] >= req.max_tokens:
                    # its last token is sampled but not yet accepted (an engine that schedules ahead of
                    # its tokens): it ends on length then, and needs no further step
                    continue
                start = req.prompt_len + req.num_generated[c] - 1
                rows.append(ScheduledRow(req.request_id, req.slots[c], start, 1, c, False, True))
                req.num_generated[c] += 1
                budget -= 1
        # prefills under way get only half of the budget while an arrival could be admitted: a long
        # prompt's chunks must not hold every newcomer back until it is all read
        continuing = [r for r in self.running.values() if r.is_prefilling]
        grants = self._grant(continuing, budget - budget // 2 if self._can_admit() else budget)
        budget -= sum(grants)
        admitted: list[ScheduledRow] = []
        while budget > 0 and self._can_admit():
            req = self.waiting.popleft()
            req.slots = [self._allocate() for _ in range(req.num_choices)]
            req.status = Status.RUNNING
            self.running[req.request_id] = req
            budget -= self._schedule_prefill(req, self._chunk(req, budget), admitted)
        extra = self._grant(continuing, budget, grants)  # what the arrivals left
        for req, n, more in zip(continuing, grants, extra, strict=True):
            if n + more:
                self._schedule_prefill(req, n + more, rows)
        return ScheduledBatch(tuple(rows + admitted))

    def _can_admit(self) -> bool:
        return bool(self.waiting) and self._num_free() >= self.waiting[0].num_choices

    def _chunk(self, req: SchedRequest, budget: int, granted: int = 0) -> int:
        """Tokens of req's prompt the next chunk may take beyond `granted`, within `budget`."""
        cap = req.prompt_len - req.num_prefilled
        if self.config.max_prefill_chunk is not None:
            cap = min(cap, self.config.max_prefill_chunk)
        return max(0, min(budget, cap - granted))

    def _grant(self, reqs: list[SchedRequest], budget: int, granted: list[int] | None = None) -> list[int]:
        """Chunk sizes for reqs (oldest first) beyond what `granted` gives them, out of `budget`: the
        oldest is sure of an equal share, the rest goes to the fewest tokens left first (a prompt
        admitted beside a long one is not left waiting for all of it, and equal long prompts still
        finish one after another rather than all at the end)."""
        granted = granted or [0] * len(reqs)
        wants = [self._chunk(req, budget, g) for req, g in zip(reqs, granted, strict=True)]
        out = [0] * len(reqs)
        if len(reqs) > 1:
            out[0] = min(wants[0], budget // len(reqs))
            budget -= out[0]
        left = [r.prompt_len - r.num_prefilled - g for r, g in zip(reqs, granted, strict=True)]
        for i in sorted(range(len(reqs)), key=lambda i: left[i]):
            more = min(wants[i] - out[i], budget)
            out[i] += more
            budget -= more
        return out

    def _schedule_prefill(self, req: SchedRequest, n: int, rows: list[ScheduledRow]) -> int:
        """Append req's next prefill chunk of n tokens (n <= what `_chunk` allows) to rows."""
        start = req.num_prefilled
        req.num_prefilled += n
        is_last = not req.is_prefilling
        fork_to = tuple(req.slots[1:]) if is_last else ()
        if is_last:
            req.num_generated = [1] * req.num_choices
        rows.append(ScheduledRow(req.request_id, req.slots[0], start, n, 0, True, is_last, fork_to))
        return n

    def _free_choice_slot(self, req: SchedRequest, choice: int) -> None:
        slot = req.slots[choice]
        if slot >= 0:
            self._free(slot)
            req.slots[choice] = -1

    def _release(self, req: SchedRequest) -> None:
        for c in range(len(req.slots)):
            self._free_choice_slot(req, c)
        req.status = Status.FINISHED
