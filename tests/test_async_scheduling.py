"""Async scheduling: step k+1 is scheduled and its forward enqueued while step k is in flight, its decode
inputs copied from step k's sampled tokens on the device. Tokens must equal the sequential engine's for
every request whose sampling does not depend on the batch (greedy, seeded), with stop conditions,
penalties, n > 1, chunked prefill and slot reuse; failures and aborts while a step is in flight must
fail or end only what they concern."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler import SchedRequest, Scheduler, SchedulerConfig
from serving.llm import LLM, RequestOutput
from serving.types import SamplingParams
from tests.test_engine_overlap import Recorder

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _llm(tiny_ckpt_dir: Any, async_scheduling: bool, **kw: Any) -> LLM:
    kw = {"max_num_seqs": 4, "max_num_batched_tokens": 32, **kw}
    return LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", async_scheduling=async_scheduling, **kw)


@pytest.fixture(scope="module")
def engines(tiny_ckpt_dir) -> dict[bool, LLM]:
    return {a: _llm(tiny_ckpt_dir, a) for a in (False, True)}


def _prompt(i: int, n: int = 12) -> list[int]:
    return [(37 * i + 11 * j) % 180 + 10 for j in range(n)]


def _add(llm: LLM, rec: Recorder, prompt: list[int], params: SamplingParams) -> str:
    req = llm.make_request(prompt, params)
    llm.core.validate(req)
    llm.core.add(req, rec.emit)
    return req.request_id


def _same(a: RequestOutput, b: RequestOutput) -> None:
    assert a.error is None and b.error is None
    assert len(a.choices) == len(b.choices)
    for x, y in zip(a.choices, b.choices, strict=True):
        assert x.token_ids == y.token_ids, (a.request_id, x.index)
        assert x.text == y.text and x.finish_reason == y.finish_reason and x.stop_reason == y.stop_reason
        assert len(x.logprobs) == len(y.logprobs)
        for p, q in zip(x.logprobs, y.logprobs, strict=True):
            for u, v in zip((p.chosen, *p.top), (q.chosen, *q.top), strict=True):
                assert u.token == v.token and abs(u.logprob - v.logprob) < 1e-5


def test_async_scheduling_gives_the_sequential_tokens(engines: dict[bool, LLM]) -> None:
    """Seven requests on four slots with a 32-token budget (chunked prefill beside decode, waiting
    requests taking the slots of finished ones): every choice's tokens, text, finish reason and logprobs
    equal the sequential engine's."""
    sync = engines[False]
    probe = sync.generate([_prompt(1), _prompt(5)], SamplingParams(max_tokens=12, **GREEDY))
    stop_id = probe[0].choices[0].token_ids[3]
    words = [w for w in probe[1].choices[0].text.split() if len(w) > 2]
    stop_word = words[len(words) // 2] if words else probe[1].choices[0].text[3:6]
    cases = [
        (_prompt(0), SamplingParams(max_tokens=9, **GREEDY)),
        (_prompt(1), SamplingParams(max_tokens=12, stop_token_ids=(stop_id,), **GREEDY)),
        (_prompt(2), SamplingParams(max_tokens=7, n=2, temperature=0.9, seed=7, ignore_eos=True)),
        (_prompt(3), SamplingParams(max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.5, **GREEDY)),
        (_prompt(4), SamplingParams(max_tokens=6, min_tokens=4, temperature=0.0)),
        (_prompt(5), SamplingParams(max_tokens=12, logprobs=2, stop=(stop_word,), **GREEDY)),
        (_prompt(6, 100), SamplingParams(max_tokens=5, **GREEDY)),  # four prefill chunks
    ]
    outs = {}
    for a, llm in engines.items():
        reqs = [llm.make_request(p, sp) for p, sp in cases]
        outs[a] = llm.run_requests(reqs, arrival_steps=[0, 0, 0, 1, 2, 4, 6])
        assert not llm.core.requests and llm.core.pool.num_free == llm.core.pool.num_slots
        assert llm.core._inflight is None
    assert outs[True][1].choices[0].finish_reason == "stop"  # the stop id took effect
    assert outs[True][5].choices[0].finish_reason == "stop"  # the stop string too
    for x, y in zip(outs[False], outs[True], strict=True):
        _same(x, y)


def test_the_next_forward_is_enqueued_before_the_tokens_are_taken(
    engines: dict[bool, LLM], monkeypatch
) -> None:
    """Every step after the first launches its forward while the step before is in flight, then waits
    for that step's tokens, then enqueues its own sampling; the host never waits with nothing queued.
    The earlier step's text goes out right after that, while the device runs this step."""
    llm = engines[True]
    rec = Recorder(llm.core, monkeypatch)
    _add(llm, rec, _prompt(7), SamplingParams(max_tokens=6, **GREEDY))
    while llm.core.scheduler.has_work():
        llm.core.step()
    steps = len(rec.batches)
    assert steps == 6 and rec.inflight == [False] + [True] * 5
    order = [e for e in rec.events if e[0] != "delta"]
    for k in range(1, steps):
        assert order.index(("launch", k)) < order.index(("result", k - 1)) < order.index(("sample", k)), order
    deltas = [v for kind, v in rec.events if kind == "delta"]
    assert len(deltas) == 6 and deltas[-1].finish_reason == "length"
    at = [i for i, (kind, _) in enumerate(rec.events) if kind == "delta"]  # delta k: step k's token
    for k in range(steps - 1):
        assert rec.events.index(("sample", k + 1)) < at[k], rec.events
        if k + 2 < steps:
            assert at[k] < rec.events.index(("launch", k + 2)), rec.events


def test_a_finished_choice_gets_no_token_after_its_last(engines: dict[bool, LLM], monkeypatch) -> None:
    """A choice that ends on a stop token still has a row in the step enqueued behind it; that row's
    token is never sampled into its output and nothing follows its final delta."""
    llm = engines[True]
    first = engines[False].generate([_prompt(8)], SamplingParams(max_tokens=10, **GREEDY))[0]
    stop_id = first.choices[0].token_ids[2]
    rec = Recorder(llm.core, monkeypatch)
    rid = _add(llm, rec, _prompt(8), SamplingParams(max_tokens=10, stop_token_ids=(stop_id,), **GREEDY))
    other = _add(llm, rec, _prompt(12, 20), SamplingParams(max_tokens=8, **GREEDY))
    while llm.core.scheduler.has_work():
        llm.core.step()
    mine = [v for kind, v in rec.events if kind == "delta" and v.request_id == rid]
    assert [d.finish_reason for d in mine][-1] == "stop"
    assert all(d.finish_reason is None for d in mine[:-1])
    sampled_in = [i for i, b in enumerate(rec.batches) if any(r.request_id == rid for r in b.rows)]
    assert len(sampled_in) >= len(mine)  # one wasted row at most, after the stop
    assert len(sampled_in) <= len(mine) + 1
    theirs = [v for kind, v in rec.events if kind == "delta" and v.request_id == other]
    assert theirs[-1].finish_reason == "length" and sum(len(d.token_ids) for d in theirs) == 8


def test_abort_while_a_step_is_in_flight(engines: dict[bool, LLM], monkeypatch) -> None:
    llm = engines[True]
    rec = Recorder(llm.core, monkeypatch)
    rid = _add(llm, rec, _prompt(13), SamplingParams(max_tokens=50, **GREEDY))
    for _ in range(4):
        llm.core.step()
    assert llm.core._inflight is not None
    llm.core.abort(rid)
    mine = [v for kind, v in rec.events if kind == "delta" and v.request_id == rid]
    assert mine[-1].finish_reason == "abort" and all(d.finish_reason is None for d in mine[:-1])
    assert llm.core.pool.num_free == llm.core.pool.num_slots
    count = len(rec.events)
    out = llm.generate([_prompt(9)], SamplingParams(max_tokens=4, **GREEDY))  # takes the in-flight step
    assert [v for kind, v in rec.events[count:] if kind == "delta" and v.request_id == rid] == []
    ref = engines[False].generate([_prompt(9)], SamplingParams(max_tokens=4, **GREEDY))
    _same(out[0], ref[0])


def test_a_request_fault_beside_a_step_in_flight(engines: dict[bool, LLM]) -> None:
    """A request whose prefill input fails is failed alone; the step in flight and the requests beside
    it go on and give the sequential engine's tokens."""
    llm = engines[True]
    reqs = [llm.make_request(_prompt(i), SamplingParams(max_tokens=8, **GREEDY)) for i in (10, 11)]
    bad = reqs[1].request_id

    def fault(er: Any) -> None:
        if er.request_id == bad:
            raise ValueError("broken image")

    llm.core.fault_hook = fault
    try:
        outs = llm.run_requests(reqs, arrival_steps=[0, 3])  # arrives while the first is in flight
    finally:
        llm.core.fault_hook = None
    assert outs[1].error is not None and outs[1].choices[0].finish_reason == "error"
    ref = engines[False].generate([_prompt(10)], SamplingParams(max_tokens=8, **GREEDY))
    _same(outs[0], ref[0])
    assert llm.core.pool.num_free == llm.core.pool.num_slots


def test_a_device_fault_in_the_step_in_flight(engines: dict[bool, LLM], monkeypatch) -> None:
    """The wait for an in-flight step raises: its requests fail (after the text of their earlier
    tokens), their slots are freed, and the engine serves the next request."""
    llm = engines[True]
    rec = Recorder(llm.core, monkeypatch)
    rids = [_add(llm, rec, _prompt(i), SamplingParams(max_tokens=30, **GREEDY)) for i in (14, 15)]
    for _ in range(3):
        llm.core.step()
    inflight = llm.core._inflight[1]

    def fail() -> Any:
        raise RuntimeError("device fault")

    inflight.result = fail
    llm.core.step()
    for rid in rids:
        mine = [v for kind, v in rec.events if kind == "delta" and v.request_id == rid]
        assert [d.finish_reason for d in mine] == [None] * (len(mine) - 1) + ["error"]
    llm.core.step()  # the step enqueued behind the failed one: its rows are dropped
    assert not llm.core.requests and llm.core.pool.num_free == llm.core.pool.num_slots
    out = llm.generate(["again"], SamplingParams(max_tokens=4, **GREEDY))
    assert len(out[0].choices[0].token_ids) == 4 and out[0].choices[0].finish_reason == "length"


def test_scheduler_does_not_schedule_past_max_tokens() -> None:
    """A choice whose last token is sampled but not yet accepted (scheduling ahead) gets no row."""
    free = list(range(2))
    sched = Scheduler(SchedulerConfig(2, 8), free.pop, free.append, lambda: len(free))
    sched.add(SchedRequest("a", prompt_len=3, max_tokens=2))
    assert [r.num_tokens for r in sched.schedule().rows] == [3]  # prefill samples token 1
    assert [r.start for r in sched.schedule().rows] == [3]  # token 2
    assert sched.schedule().is_empty  # token 2 is the last: nothing until it is accepted
    assert sched.finish_choice("a", 0) and not sched.has_work()


def test_off_unless_asked_for(tiny_ckpt_dir) -> None:
    from serving.cli import build_parser, engine_config_from_args

    parser = build_parser()
    for argv, want in (([], False), (["--async-scheduling"], True), (["--no-async-scheduling"], False)):
        args = parser.parse_args(["serve", *argv])
        assert engine_config_from_args(args, str(tiny_ckpt_dir)).async_scheduling is want
    llm = LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", max_num_seqs=1)
    assert llm.core.async_scheduling is False  # opt-in: it costs time to first token (docs/benchmarks.md)


def test_an_input_fault_after_a_choice_finished_in_flight(engines: dict[bool, LLM], monkeypatch) -> None:
    """The step being launched holds the dropped row of a request that its in-flight predecessor
    finishes, and a new request's input preparation fails in that launch: the in-flight tokens are
    taken first (the finished request completes normally), the faulty request alone fails, and the
    rolled-back rows of the others run again."""
    from serving.runner import RequestFault

    llm = engines[True]
    first = engines[False].generate([_prompt(16)], SamplingParams(max_tokens=10, **GREEDY))[0]
    stop_id = first.choices[0].token_ids[2]  # the third token ends request a
    reqs = [
        llm.make_request(_prompt(16), SamplingParams(max_tokens=10, stop_token_ids=(stop_id,), **GREEDY)),
        llm.make_request(_prompt(17), SamplingParams(max_tokens=6, **GREEDY)),
        llm.make_request(_prompt(18), SamplingParams(max_tokens=6, **GREEDY)),
    ]
    bad = reqs[2].request_id
    real = llm.core.runner._ensure_vision

    def ensure(er: Any) -> None:
        if er.request_id == bad:
            raise RequestFault(bad, ValueError("unreadable video"))
        real(er)

    monkeypatch.setattr(llm.core.runner, "_ensure_vision", ensure)
    # step 3 launches a's dropped fourth row, b's decode and c's prefill, while step 2 (a's stop) is in flight
    outs = llm.run_requests(reqs, arrival_steps=[0, 0, 3])
    assert (
        outs[0].choices[0].finish_reason == "stop"
        and outs[0].choices[0].token_ids == first.choices[0].token_ids[:3]
    )
    assert outs[2].choices[0].finish_reason == "error"
    ref = engines[False].generate([_prompt(17)], SamplingParams(max_tokens=6, **GREEDY))
    _same(outs[1], ref[0])
    assert not llm.core.requests and llm.core.pool.num_free == llm.core.pool.num_slots
