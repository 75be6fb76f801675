"""The engine's overlap of host work with the device: a step's text is made and emitted during the next
step, between that step's launch and its wait when the launch is a graph replay, before the launch when
the launch is itself host-bound (an eager forward); what scheduling depends on is settled before."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from serving.llm import LLM, Prompt
from serving.types import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_ckpt_dir) -> LLM:
    return LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=64)


def graph_decode(batch: Any) -> bool:
    """The runner's `launch_is_host_bound` on a GPU with CUDA graphs: every step but a decode-only one."""
    return not batch.is_decode_only


class Recorder:
    """Wraps the runner's launch_forward, the sampling it hands back and the sampled handles' result;
    records them with the deltas, in order. `host_bound` replaces the runner's `launch_is_host_bound`
    (by default as on a GPU with CUDA graphs; None keeps the runner's own: on the CPU every launch)."""

    def __init__(
        self,
        core: Any,
        monkeypatch: pytest.MonkeyPatch,
        host_bound: Callable[[Any], bool] | None = graph_decode,
    ) -> None:
        self.events: list[tuple[str, Any]] = []
        self.batches: list[Any] = []
        self.inflight: list[bool] = []  # per launch: whether an earlier step was still in flight
        launch_forward = core.runner.launch_forward

        def recording_launch(batch: Any, reqs: Any, prev: Any = None) -> Any:
            step = len(self.batches)
            self.events.append(("launch", step))
            self.batches.append(batch)
            self.inflight.append(prev is not None)
            forward = launch_forward(batch, reqs, prev)
            sample = forward.sample

            def recording_sample(reqs: Any) -> Any:
                self.events.append(("sample", step))
                handle = sample(reqs)
                result = handle.result

                def recording_result() -> Any:
                    self.events.append(("result", step))
                    return result()

                handle.result = recording_result
                return handle

            forward.sample = recording_sample
            return forward

        monkeypatch.setattr(core.runner, "launch_forward", recording_launch)
        if host_bound is not None:
            monkeypatch.setattr(core.runner, "launch_is_host_bound", host_bound)

    def emit(self, d: Any) -> None:
        self.events.append(("delta", d))


def _add(llm: LLM, rec: Recorder, text: str, params: SamplingParams) -> str:
    req = llm.make_request(Prompt(messages=[{"role": "user", "content": text}]), params)
    llm.core.validate(req)
    llm.core.add(req, rec.emit)
    return req.request_id


def _run(llm: LLM) -> None:
    while llm.core.scheduler.has_work():
        llm.core.step()


def test_text_of_a_step_is_emitted_while_the_next_step_runs(llm: LLM, monkeypatch) -> None:
    rec = Recorder(llm.core, monkeypatch)
    rid = _add(llm, rec, "count to ten", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    _run(llm)
    kinds = [k if k != "delta" else ("delta", v.token_ids) for k, v in rec.events]
    steps = len(rec.batches)
    assert steps == 6  # one prefill step (samples token 1), five decode steps
    # every step's tokens but the last are emitted between the next launch and the next wait
    for step in range(steps - 1):
        at_launch = rec.events.index(("launch", step + 1))
        at_result = rec.events.index(("result", step + 1))
        between = [v for k, v in rec.events[at_launch:at_result] if k == "delta"]
        assert len(between) == 1 and between[0].request_id == rid, kinds
    # the last step's text goes out before step() returns (nothing follows it)
    last = [v for k, v in rec.events[rec.events.index(("result", steps - 1)) :] if k == "delta"]
    assert len(last) == 1 and last[0].finish_reason == "length"
    assert not llm.core._pending


def test_text_goes_out_before_a_host_bound_launch(llm: LLM, monkeypatch) -> None:
    """A step with prefill rows is an eager forward, whose launch takes the host as long as the device
    takes to run it: the text of the step before goes out first, not after the whole launch."""
    rec = Recorder(llm.core, monkeypatch)
    first = _add(llm, rec, "count to ten", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    for _ in range(3):  # the prefill, then two decode steps
        llm.core.step()
    _add(llm, rec, "and then some more", SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    _run(llm)
    mixed = next(i for i, b in enumerate(rec.batches) if not b.is_decode_only and i > 0)
    assert mixed == 3 and any(r.is_prefill for r in rec.batches[mixed].rows)
    at_launch = rec.events.index(("launch", mixed))
    before = [v for k, v in rec.events[rec.events.index(("result", mixed - 1)) : at_launch] if k == "delta"]
    assert [d.request_id for d in before] == [first]  # step 2's token, before the eager launch
    # the decode steps after it are graph replays again: their text comes after the next launch
    for step in range(mixed + 1, len(rec.batches) - 1):
        window = rec.events[rec.events.index(("launch", step + 1)) : rec.events.index(("result", step + 1))]
        assert any(k == "delta" for k, _ in window), step
    assert not llm.core._pending


def test_on_the_cpu_every_launch_is_host_bound(llm: LLM, monkeypatch) -> None:
    """Without CUDA graphs the runner computes in the launch: each step's text goes out before the next
    launch, so no token waits for a whole forward of other work."""
    rec = Recorder(llm.core, monkeypatch, host_bound=None)
    _add(llm, rec, "count to ten", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    _run(llm)
    assert all(llm.core.runner.launch_is_host_bound(b) for b in rec.batches)
    for step in range(len(rec.batches) - 1):
        window = rec.events[rec.events.index(("result", step)) : rec.events.index(("launch", step + 1))]
        assert [k for k, _ in window].count("delta") == 1, step


def test_finished_choices_are_never_scheduled_again(llm: LLM, monkeypatch) -> None:
    """A choice ending on its length, a stop token or a stop string leaves the very next batch."""
    greedy = {"temperature": 0.0, "ignore_eos": True}

    def run(stop_id: list[int], stop: list[str]) -> tuple[Recorder, dict[str, str]]:
        with monkeypatch.context() as m:
            rec = Recorder(llm.core, m)
            rids = {
                "length": _add(llm, rec, "tell a story", SamplingParams(max_tokens=3, **greedy)),
                "stop id": _add(
                    llm, rec, "a story", SamplingParams(max_tokens=12, stop_token_ids=stop_id, **greedy)
                ),
                "stop string": _add(llm, rec, "story", SamplingParams(max_tokens=12, stop=stop, **greedy)),
            }
            _run(llm)
        return rec, rids

    # the same batch without stop conditions: what the stopped requests would say
    probe, probe_ids = run([], [])
    said = {
        name: [v for k, v in probe.events if k == "delta" and v.request_id == rid]
        for name, rid in probe_ids.items()
    }
    stop_id = said["stop id"][4].token_ids[0]
    text = "".join(d.text for d in said["stop string"])
    stop_word = next(w for w in text.split() if len(w) > 2)
    rec, rids = run([stop_id], [stop_word])
    deltas = [v for k, v in rec.events if k == "delta"]
    for name, rid in rids.items():
        mine = [d for d in deltas if d.request_id == rid]
        assert mine[-1].finish_reason == ("length" if name == "length" else "stop"), name
        assert all(d.finish_reason is None for d in mine[:-1]), name
        rows = [
            i for i, b in enumerate(rec.batches) if any(r.request_id == rid and r.is_sampled for r in b.rows)
        ]
        # sampled in consecutive steps, one token each, and never scheduled after the last
        assert len(rows) == len(mine) and rows == list(range(rows[0], rows[0] + len(rows))), name
        assert not any(r.request_id == rid for b in rec.batches[rows[-1] + 1 :] for r in b.rows), name
    assert len([d for d in deltas if d.request_id == rids["stop id"]]) <= 5
    stopped = "".join(d.text for d in deltas if d.request_id == rids["stop string"])
    assert stop_word not in stopped and text.startswith(stopped) and len(stopped) < len(text)


def test_abort_emits_the_pending_text_first(llm: LLM, monkeypatch) -> None:
    rec = Recorder(llm.core, monkeypatch)
    rid = _add(llm, rec, "go on", SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        llm.core.step()
    assert llm.core._pending  # the last step's text waits for the next step
    llm.core.abort(rid)
    mine = [v for k, v in rec.events if k == "delta"]
    assert len(mine) == 5 and [d.finish_reason for d in mine] == [None, None, None, None, "abort"]
    assert not llm.core._pending and llm.core.pool.num_free == llm.core.pool.num_slots


@pytest.fixture(scope="module")
def llm_async(tiny_ckpt_dir) -> LLM:
    return LLM(
        str(tiny_ckpt_dir),
        device="cpu",
        dtype="float32",
        max_num_seqs=4,
        max_num_batched_tokens=64,
        async_scheduling=True,
    )


@pytest.mark.parametrize("where", ["launch", "wait"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_failed_step_fails_its_batch_and_the_engine_goes_on(
    llm: LLM, llm_async: LLM, monkeypatch, where: str, async_scheduling: bool
) -> None:
    """A step whose launch raises, or whose wait for the device does, fails the requests of its batch
    (after the text of their earlier tokens), frees their slots, and the next request is served. With
    async scheduling, the step in flight when the next launch fails is taken first (its tokens kept)."""
    llm = llm_async if async_scheduling else llm
    rec = Recorder(llm.core, monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    rids = [_add(llm, rec, "first", params), _add(llm, rec, "second", params)]
    for _ in range(3):
        llm.core.step()
    # step 3's text is pending (sequential), or step 3 is in flight with step 2's text already out (async)
    assert len(llm.core._pending) == (0 if async_scheduling else 2)
    assert (llm.core._inflight is not None) is async_scheduling
    launch_forward = llm.core.runner.launch_forward

    def failing_launch(batch: Any, reqs: Any, prev: Any = None) -> Any:
        if where == "launch":
            raise RuntimeError("device fault")
        forward = launch_forward(batch, reqs, prev)
        sample = forward.sample

        def failing_sample(reqs: Any) -> Any:
            handle = sample(reqs)

            def fail() -> Any:
                raise RuntimeError("device fault")

            handle.result = fail
            return handle

        forward.sample = failing_sample
        return forward

    with monkeypatch.context() as m:
        m.setattr(llm.core.runner, "launch_forward", failing_launch)
        llm.core.step()
    if async_scheduling and where == "wait":
        llm.core.step()  # the failing wait is that of the step left in flight: the next step takes it
    for rid in rids:
        mine = [v for k, v in rec.events if k == "delta" and v.request_id == rid]
        assert [d.finish_reason for d in mine] == [None] * (len(mine) - 1) + ["error"]
        assert (
            len(mine) == 4
        )  # the tokens of steps 1-3 (step 3's pending or in flight at the fault), the error
    assert not llm.core.requests and llm.core.pool.num_free == llm.core.pool.num_slots
    out = llm.generate(["again"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].choices[0].token_ids) == 4 and out[0].choices[0].finish_reason == "length"


def test_async_output_off_emits_each_step_before_the_next_launch(tiny_ckpt_dir, monkeypatch) -> None:
    """--disable-async-output: the text of a step goes out before step() returns, as one stream."""
    seq = LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", max_num_seqs=2, async_output=False)
    rec = Recorder(seq.core, monkeypatch)
    _add(seq, rec, "count to ten", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    steps = 0
    while seq.core.scheduler.has_work():
        seq.core.step()
        steps += 1
        assert not seq.core._pending
        assert rec.events[-1][0] == "delta" and rec.events[-2] == ("result", steps - 1)
    assert steps == 5
