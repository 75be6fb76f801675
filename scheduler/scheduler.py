"""First-come-first-served continuous batching with chunked prefill under a per-step token budget.

Every step, each running choice that has finished prefill gets one decode token first (so inter-token latency
stays bounded), then the remaining budget goes to prefill chunks in arrival order; waiting requests are admitted
in strict FIFO order when enough slots are free for all their choices. Admission is only "are slots free":
memory per request is constant, so nothing is ever preempted.
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
        for req in self.running.values():
            if budget == 0:
                break
            if req.is_prefilling:
                budget -= self._schedule_prefill(req, budget, rows)
        while budget > 0 and self.waiting and self._num_free() >= self.waiting[0].num_choices:
            req = self.waiting.popleft()
            req.slots = [self._allocate() for _ in range(req.num_choices)]
            req.status = Status.RUNNING
            self.running[req.request_id] = req
            budget -= self._schedule_prefill(req, budget, rows)
        return ScheduledBatch(tuple(rows))

    def _schedule_prefill(self, req: SchedRequest, budget: int, rows: list[ScheduledRow]) -> int:
        cap = budget if self.config.max_prefill_chunk is None else min(budget, self.config.max_prefill_chunk)
        n = min(cap, req.prompt_len - req.num_prefilled)
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
