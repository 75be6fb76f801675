"""The engine: a loop in its own thread that schedules, runs the model and emits deltas.

`EngineCore` is the single-threaded step logic (testable without threads); `AsyncEngine` runs it in a
thread and offers the asyncio front the API uses (`generate()` -> async iterator of deltas, `abort()`,
`health()`). Requests cross the thread boundary through an inbox; deltas come back through
`loop.call_soon_threadsafe`, so the event loop never waits on the GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import torch

from cache.pool import StatePool
from scheduler import QueueFull, SchedRequest, ScheduledBatch, Scheduler, SchedulerConfig
from serving.config import EngineConfig
from serving.detokenizer import logprob_entry
from serving.errors import EngineDead, EngineOverloaded, RequestTooLarge
from serving.runner import ModelRunner, PendingStep, RequestFault, SampledToken
from serving.sampler import SamplingRow, make_generator
from serving.sequence import EngineRequest
from serving.stop import ChoiceDecoder, StepResult
from serving.types import (
    Delta,
    EngineHealth,
    GenerateRequest,
    LogprobEntry,
    RequestStats,
    Usage,
)

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns the scheduler, the runner and the live requests. Only the engine thread calls it."""

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        pool: StatePool,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
        metrics: Any = None,
    ) -> None:
        self.config = config
        self.runner = runner
        self.pool = pool
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.metrics = metrics
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=pool.num_slots,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_waiting=config.max_waiting,
                max_prefill_chunk=config.max_prefill_chunk,
            ),
            allocate_slot=pool.allocate,
            free_slot=pool.free,
            num_free_slots=lambda: pool.num_free,
        )
        self.requests: dict[str, EngineRequest] = {}
        self.fault_hook: Callable[[EngineRequest], None] | None = None  # tests inject faults here
        # accepted tokens whose text is not made yet: (request, token, StepResult if already made,
        # request done, first token of its choice)
        self._pending: list[tuple[EngineRequest, SampledToken, StepResult | None, bool, bool]] = []
        self.on_emit: Callable[[], None] | None = None  # called after deltas were emitted mid-step
        # async scheduling: the step enqueued last, whose tokens the host has not taken yet
        self.async_scheduling = config.async_scheduling
        self._inflight: tuple[ScheduledBatch, PendingStep] | None = None

    # -- requests -------------------------------------------------------------------------------------
    def validate(self, req: GenerateRequest) -> None:
        """Checks that need no model work; raises ValueError / RequestTooLarge."""
        p = req.sampling
        p.validate(vocab_size=self.runner.model.config.text.vocab_size)
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n > self.config.max_prompt_len:
            raise RequestTooLarge(
                f"the prompt has {n} tokens; this server accepts at most {self.config.max_prompt_len}"
            )
        if p.max_tokens > self.config.max_tokens_limit:
            raise RequestTooLarge(
                f"max_tokens {p.max_tokens} exceeds the limit {self.config.max_tokens_limit}"
            )
        if p.n > self.pool.num_slots:
            raise RequestTooLarge(f"n={p.n} exceeds the {self.pool.num_slots} slots of this server")
        vocab = self.runner.model.config.text.vocab_size
        if min(req.prompt_token_ids) < 0 or max(req.prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        if req.positions.shape != (3, n):
            raise ValueError(f"positions must be [3, {n}], got {list(req.positions.shape)}")

    def add(self, req: GenerateRequest, emit: Callable[[Delta], None]) -> None:
        """Queue a request that passed `validate()`; raises QueueFull, or ValueError for a live duplicate id."""
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id}")
        p = req.sampling
        device = self.runner.device
        rows = [
            SamplingRow(
                params=p,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=[],
                generator=None if p.seed is None else make_generator(p.seed, device, c),
                eos_token_ids=self.eos_token_ids,
            )
            for c in range(p.n)
        ]
        er = EngineRequest(
            req=req,
            sched=SchedRequest(req.request_id, len(req.prompt_token_ids), p.max_tokens, p.n),
            rows=rows,
            decoders=[ChoiceDecoder(self.tokenizer, p, self.eos_token_ids) for _ in range(p.n)],
            stats=RequestStats(
                arrival_time=req.arrival_time,
                prompt_tokens=len(req.prompt_token_ids),
                n=p.n,
                max_tokens=p.max_tokens,
            ),
            emit=emit,
            prompt_ids=torch.tensor(req.prompt_token_ids, dtype=torch.int64),
        )
        self.scheduler.add(er.sched)  # raises QueueFull
        self.requests[req.request_id] = er

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> None:
        self._emit_pending()  # a choice's deltas stay in order: its text, then the final abort delta
        er = self.requests.pop(request_id, None)
        if er is None:
            return
        self.scheduler.abort(request_id)
        for c in range(er.sched.num_choices):
            if not er.sched.finished[c]:
                er.sched.finished[c] = True
                er.emit(self._final(er, c, "", reason, None, error))
        self._finish_stats(er, reason)

    # -- the step -------------------------------------------------------------------------------------
    def step(self) -> int:
        """Schedule and run one batch; returns the number of tokens it processed (0: nothing to do).

        The text of a step's tokens is made (detokenization, stop strings aside) and emitted during the
        next step, after that step's launch when the launch is a CUDA-graph replay: the host does it while
        the device computes. Before a launch that is itself host-bound (an eager forward: any step with
        prefill rows), the text goes out first, or it would wait for the whole launch. What the next
        schedule needs is settled before it: each token is appended to its row, and a choice that ends on
        a token id or on its length (or on a stop string, which is checked at once for choices that have
        them) releases its slot. With no step to follow, or with `async_output` off, the text is emitted
        before returning.

        With `async_scheduling`, a step is scheduled and its forward enqueued while the step before it is
        still in flight: its decode rows continue every unfinished choice of that step and take their
        input tokens from the device. Then the engine waits for the earlier step's tokens, accepts them,
        enqueues this step's sampling (which reads the accepted tokens: penalties, min_tokens) and emits
        their text while the device runs this step; the device finds the next forward queued when it
        finishes. A choice that ended in the earlier step still has its row in this one: its token is
        dropped (a row of wasted work per finished choice)."""
        self._expire_deadlines()
        batch = self.scheduler.schedule()
        if batch.is_empty:
            done = self._finish_inflight()
            self._emit_pending()
            return done
        now = time.monotonic()
        for row in batch.rows:
            er = self.requests[row.request_id]
            if er.stats.scheduled_time is None:
                er.stats.scheduled_time = now
            if self.fault_hook is not None and row.is_prefill:
                try:
                    self.fault_hook(er)
                except Exception as e:  # noqa: BLE001
                    return self._fail_rows_of(batch, {row.request_id}, e)
        inflight = self._inflight[1] if self._inflight is not None else None
        if self.runner.launch_is_host_bound(batch):
            self._emit_pending()
        try:
            forward = self.runner.launch_forward(batch, self.requests, inflight)
            launched = None if self.async_scheduling else forward.sample(self.requests)
        except RequestFault as f:
            self._finish_inflight()  # the step before ran: its tokens are kept
            return self._fail_rows_of(batch, {f.request_id}, f.cause)
        except Exception as e:  # noqa: BLE001 - a failed forward may have written part of every row's state
            self._finish_inflight()
            return self._forward_failed(batch, e)
        if launched is None:  # async scheduling: take the step before, then enqueue this one's sampling
            self._finish_inflight()
            try:
                self._inflight = (batch, forward.sample(self.requests))
            except Exception as e:  # noqa: BLE001 - as below
                return self._forward_failed(batch, e)
            self._emit_pending()  # the earlier step's text, while the device runs this one
        else:
            self._emit_pending()  # the previous step's text, while the device runs this one
            try:
                sampled = launched.result()
            except Exception as e:  # noqa: BLE001 - as above: the device failed somewhere in the step
                return self._forward_failed(batch, e)
            self._accept(sampled)
            self._record_step(batch)
        if not self.config.async_output or not self.scheduler.has_work():
            self._emit_pending()
        return batch.num_tokens

    def _finish_inflight(self) -> int:
        """Wait for the step in flight (async scheduling) and accept its tokens; its token count."""
        if self._inflight is None:
            return 0
        batch, launched = self._inflight
        self._inflight = None
        try:
            sampled = launched.result()
        except Exception as e:  # noqa: BLE001 - the device failed somewhere in that step
            return self._forward_failed(batch, e)
        self._accept(sampled)
        self._record_step(batch)
        return batch.num_tokens

    def _forward_failed(self, batch: ScheduledBatch, cause: BaseException) -> int:
        logger.error("forward failed; failing the %d requests of this batch", len(batch.rows), exc_info=cause)
        return self._fail_rows_of(batch, {r.request_id for r in batch.rows}, cause)

    def _fail_rows_of(self, batch: ScheduledBatch, request_ids: set[str], cause: BaseException) -> int:
        """Fail `request_ids`. Every other row of the batch did not run (a per-request fault is raised before
        the forward; a failed forward fails the whole batch), so its scheduled counters are rolled back and
        it is scheduled again by the next step."""
        logger.error("request(s) %s failed: %r", sorted(request_ids), cause)
        for row in batch.rows:
            er = self.requests.get(row.request_id)
            if row.request_id in request_ids or er is None:  # None: finished by the step before
                continue
            sched = er.sched
            if row.is_prefill:
                sched.num_prefilled -= row.num_tokens
                if row.is_sampled:
                    sched.num_generated = [0] * sched.num_choices
            else:
                sched.num_generated[row.choice] -= 1
        for rid in request_ids:
            self.abort(
                rid,
                reason="error",
                error=f"internal error while serving this request: {type(cause).__name__}",
            )
        return 0

    def _accept(self, sampled: list[SampledToken]) -> None:
        """What the next schedule depends on: append each token to its row, finish the choices that
        end with it, free their slots. The text is left to `_emit_pending`."""
        now = time.monotonic()
        for tok in sampled:
            er = self.requests.get(tok.request_id)
            if er is None or er.sched.finished[tok.choice]:
                continue
            out = er.rows[tok.choice].output_token_ids
            out.append(tok.token_id)
            st = er.stats
            if st.first_token_time is None:
                st.first_token_time = st.prefill_done_time = now
            previous = st.choice_last_token_time.get(tok.choice)
            if previous is not None:  # every choice's gaps (n > 1: as n requests of one choice)
                st.token_intervals.append(now - previous)
            st.choice_last_token_time[tok.choice] = st.last_token_time = now
            dec = er.decoders[tok.choice]
            res = dec.append(tok.token_id) if dec.ends_on_text else None
            if res is not None:
                finished = res.finish_reason is not None
            else:  # the decoder may lag behind (text is made later): count on the row's outputs
                finished = dec.finishes_with(tok.token_id, len(out))
            done = finished and self.scheduler.finish_choice(er.request_id, tok.choice)
            if done:
                self.requests.pop(er.request_id, None)
            self._pending.append((er, tok, res, done, len(out) == 1))

    def _emit_pending(self) -> None:
        """Detokenize the accepted tokens that have no text yet and emit their deltas, in order."""
        if not self._pending:
            return
        items, self._pending = self._pending, []
        for er, tok, res, done, first in items:
            if res is None:
                res = er.decoders[tok.choice].append(tok.token_id)
            lp = self._logprobs(tok) if tok.logprob is not None else None
            plp = self._prompt_logprobs(er) if first and er.req.sampling.prompt_logprobs is not None else None
            if res.finish_reason is None:  # emitted even with no text yet (a split UTF-8 character)
                er.emit(Delta(er.request_id, tok.choice, res.text, (tok.token_id,), lp, prompt_logprobs=plp))
                continue
            final = self._final(er, tok.choice, res.text, res.finish_reason, res.stop_reason, None, tok, lp)
            er.emit(replace(final, prompt_logprobs=plp) if plp is not None else final)
            if done:
                self._finish_stats(er, res.finish_reason)
        if self.on_emit is not None:
            self.on_emit()

    def _final(
        self,
        er: EngineRequest,
        choice: int,
        text: str,
        reason: str,
        stop_reason: str | int | None,
        error: str | None,
        tok: SampledToken | None = None,
        lp: tuple[LogprobEntry, ...] | None = None,
    ) -> Delta:
        return Delta(
            request_id=er.request_id,
            index=choice,
            text=text,
            token_ids=(tok.token_id,) if tok is not None else (),
            logprobs=lp,
            finish_reason=reason,
            stop_reason=stop_reason,
            usage=Usage(len(er.req.prompt_token_ids), er.decoders[choice].num_tokens),
            error=error,
        )

    def _prompt_logprobs(self, er: EngineRequest) -> tuple[LogprobEntry, ...]:
        """Every prompt token's entry (the first: logprob NaN, nothing predicts it), made once."""
        if er.prompt_logprob_entries is None:
            first = logprob_entry(self.tokenizer, er.req.prompt_token_ids[0], math.nan, ())
            rest = (logprob_entry(self.tokenizer, t, c, top) for t, c, top in er.prompt_scores)
            er.prompt_logprob_entries = (first, *rest)
        return er.prompt_logprob_entries

    def _logprobs(self, tok: SampledToken) -> tuple[LogprobEntry, ...]:
        chosen_lp, top = tok.logprob
        return (logprob_entry(self.tokenizer, tok.token_id, chosen_lp, top),)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for er in list(self.requests.values()):
            if er.req.deadline is not None and now > er.req.deadline:
                self.abort(er.request_id, reason="timeout", error="the request exceeded its deadline")

    def _finish_stats(self, er: EngineRequest, reason: str) -> None:
        st = er.stats
        st.finish_time = time.monotonic()
        st.finish_reason = reason
        st.generation_tokens = sum(d.num_tokens for d in er.decoders)
        st.longest_choice_tokens = max((d.num_tokens for d in er.decoders), default=0)
        if self.metrics is not None:
            self.metrics.on_request_finished(st)

    def record_gauges(self) -> None:
        """Refresh queue and slot gauges without counting a step's tokens."""
        self._record_tokens(0, 0)

    def _record_step(self, batch: ScheduledBatch) -> None:
        prompt = sum(r.num_tokens for r in batch.rows if r.is_prefill)
        # a sampled prefill row with fork_to samples the first token of every choice (n > 1)
        generated = sum(1 + len(r.fork_to) for r in batch.rows if r.is_sampled)
        self._record_tokens(prompt, generated, self.runner.step_mode(batch))

    def _record_tokens(self, prompt: int, gen: int, mode: str | None = None) -> None:
        if self.metrics is None:
            return
        self.metrics.on_step(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            slots_used=self.pool.num_slots - self.pool.num_free,
            slots_total=self.pool.num_slots,
            prompt_tokens=prompt,
            generation_tokens=gen,
            mode=mode,
        )
        if self.runner.vision_seconds:
            imgs, frames = self.runner.vision_items
            self.metrics.on_vision(
                num_images=imgs, num_video_frames=frames, seconds=self.runner.vision_seconds
            )
            self.runner.vision_seconds, self.runner.vision_items = 0.0, (0, 0)

    def check(self) -> None:
        """Pool integrity plus: every used slot belongs to exactly one live choice."""
        self.pool.check()
        owned = [s for er in self.requests.values() for s in er.sched.slots if s >= 0]
        if len(owned) != len(set(owned)) or len(owned) != self.pool.num_slots - self.pool.num_free:
            raise AssertionError(
                f"slots owned by requests {sorted(owned)} != {self.pool.num_slots - self.pool.num_free} used"
            )


_STOP = object()


def coalesce(items: list[Delta | BaseException]) -> list[Delta | BaseException]:
    """Merge consecutive deltas of the same choice (text, token ids and logprobs concatenated; the later
    one's finish fields win). Order is kept; an exception is never merged."""
    merged: list[Delta | BaseException] = []
    for item in items:
        last = merged[-1] if merged else None
        if (
            isinstance(item, Delta)
            and isinstance(last, Delta)
            and last.index == item.index
            and last.finish_reason is None
        ):
            logprobs = None
            if last.logprobs is not None or item.logprobs is not None:
                logprobs = (last.logprobs or ()) + (item.logprobs or ())
            merged[-1] = replace(
                item,
                text=last.text + item.text,
                token_ids=last.token_ids + item.token_ids,
                logprobs=logprobs,
            )
        else:
            merged.append(item)
    return merged


def _deliver(items: list[tuple[asyncio.Queue, Delta | BaseException]]) -> None:
    for out, item in items:
        out.put_nowait(item)


class AsyncEngine:
    """Thread-backed engine with the asyncio interface of `serving.types.EngineClient`."""

    def __init__(self, core: EngineCore, info: dict[str, Any] | None = None) -> None:
        self.core = core
        self._info = dict(info or {})
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._alive = False
        self._dead_reason = ""
        self._lock = threading.Lock()
        self._num_pending = 0  # submitted, not yet admitted into the scheduler's waiting queue or beyond
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, Delta | BaseException]] = []
        core.on_emit = self._flush  # deltas made mid-step go out at once, not after the step's sync

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self._alive = True
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._inbox.put(_STOP)
        self._wake.set()
        self._thread.join(timeout)

    def health(self) -> EngineHealth:
        alive = self._alive and self._thread.is_alive()
        return EngineHealth(is_ready=alive, is_alive=alive, is_draining=False, detail=self._dead_reason)

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    # -- the API side ---------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        """Validate and queue at once (raising EngineDead, EngineOverloaded or ValueError here), then
        return the async iterator of the request's deltas. Must be called on the event loop's thread."""
        if not (self._alive and self._thread.is_alive()):
            raise EngineDead(
                f"the engine is not running{': ' + self._dead_reason if self._dead_reason else ''}"
            )
        self.core.validate(request)
        with self._lock:
            waiting = self.core.scheduler.num_waiting + self._num_pending
            if waiting >= self.core.config.max_waiting:
                raise EngineOverloaded(f"{waiting} requests are waiting; retry later")
            self._num_pending += 1
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

        def emit(item: Delta | BaseException) -> None:  # engine thread only; delivered by _flush()
            self._outbox.append((loop, out, item))

        self._inbox.put(("add", request, emit))
        self._wake.set()
        return self._stream(request, out)

    async def _stream(self, request: GenerateRequest, out: asyncio.Queue) -> AsyncIterator[Delta]:
        remaining = request.sampling.n
        try:
            while remaining:
                items = [await out.get()]
                while (
                    not out.empty()
                ):  # a consumer that fell behind gets one delta per choice, not one per token
                    items.append(out.get_nowait())
                for item in coalesce(items):
                    if isinstance(item, BaseException):
                        raise item
                    if item.finish_reason is not None:
                        remaining -= 1
                    yield item
        finally:
            if remaining:  # the consumer went away (client disconnect): free the slot
                self._post_abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        self._post_abort(request_id)

    def _post_abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    # -- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                running = self._drain_inbox()
                self._flush()
                if not running:
                    return
                if self.core.scheduler.has_work():
                    self.core.step()
                    self._flush()
                else:
                    self._wake.wait(0.5)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - the engine is dead: fail everything, fast
            logger.exception("engine thread died")
            self._dead_reason = f"engine thread died: {type(e).__name__}: {e}"
            self._alive = False
            dead = EngineDead(self._dead_reason)
            for er in list(self.core.requests.values()):
                er.emit(dead)
            self._fail_inbox(dead)
            self._flush()

    def _flush(self) -> None:
        """Hand this step's deltas to their event loops: one wake-up per loop per step, not per delta."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Delta | BaseException]]] = {}
        for loop, out, item in batch:
            by_loop.setdefault(loop, []).append((out, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, items)

    def _drain_inbox(self) -> bool:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if item is _STOP:
                self._alive = False
                return False
            kind, payload, emit = item
            if kind == "abort":
                self.core.abort(payload)
                self.core.record_gauges()  # an idle engine takes no step that would refresh them
                continue
            with self._lock:
                self._num_pending -= 1
            try:  # generate() validated it on the event loop; add() checks what only this thread knows
                self.core.add(payload, emit)
            except QueueFull as e:
                emit(EngineOverloaded(str(e)))
            except ValueError as e:
                emit(e)

    def _fail_inbox(self, error: BaseException) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[0] == "add":
                item[2](error)
