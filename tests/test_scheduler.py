"""Scheduler unit tests with fake requests (no torch)."""

from __future__ import annotations

import random

import pytest

from cache.slots import SlotAllocator
from scheduler import QueueFull, SchedRequest, Scheduler, SchedulerConfig


def make(num_slots: int = 4, budget: int = 64, max_waiting: int = 100) -> tuple[Scheduler, SlotAllocator]:
    slots = SlotAllocator(num_slots)
    sched = Scheduler(
        SchedulerConfig(num_slots, budget, max_waiting=max_waiting),
        slots.allocate,
        slots.free,
        lambda: slots.num_free,
    )
    return sched, slots


def finish_if_done(sched: Scheduler, batch, max_tokens: dict[str, int]) -> None:
    """Emulate the engine: a choice finishes when it has generated max_tokens tokens."""
    for row in batch.rows:
        if not row.is_sampled:
            continue
        req = sched.running.get(row.request_id)
        if req is None:
            continue
        choices = range(req.num_choices) if row.is_prefill else (row.choice,)
        for c in choices:
            if req.num_generated[c] >= max_tokens[row.request_id] and not req.finished[c]:
                sched.finish_choice(row.request_id, c)


def test_token_budget_respected_and_prefill_chunked():
    sched, slots = make(num_slots=4, budget=32)
    for i in range(6):
        sched.add(SchedRequest(f"r{i}", prompt_len=50 + i, max_tokens=5))
    max_tokens = {f"r{i}": 5 for i in range(6)}
    steps = 0
    while sched.has_work():
        batch = sched.schedule()
        assert batch.num_tokens <= 32
        assert len({r.slot for r in batch.rows}) == len(batch.rows), "two rows share a slot"
        finish_if_done(sched, batch, max_tokens)
        slots.check()
        steps += 1
        assert steps < 1000
    assert slots.num_free == 4


def test_chunks_cover_prompt_exactly_once():
    sched, _ = make(num_slots=2, budget=7)
    sched.add(SchedRequest("a", prompt_len=30, max_tokens=1))
    covered = []
    while sched.has_work():
        batch = sched.schedule()
        for r in batch.rows:
            if r.is_prefill:
                covered.extend(range(r.start, r.start + r.num_tokens))
                if r.is_sampled:
                    sched.finish_choice("a", 0)
    assert covered == list(range(30))


def test_long_prompt_does_not_stall_decodes():
    sched, _ = make(num_slots=4, budget=256)
    for i in range(3):
        sched.add(SchedRequest(f"short{i}", prompt_len=8, max_tokens=10_000))
    sched.schedule()  # the three short prompts prefill in one step
    sched.add(SchedRequest("long", prompt_len=10_000, max_tokens=4))
    prefill_steps = 0
    while "long" not in sched.running or sched.running["long"].is_prefilling:
        batch = sched.schedule()
        decoded = {r.request_id for r in batch.rows if not r.is_prefill}
        assert decoded == {"short0", "short1", "short2"}, "every running decode advances every step"
        assert batch.num_tokens <= 256
        prefill_steps += 1
    # 10,000 tokens with 253 per step left after the three decode tokens
    assert prefill_steps == -(-10_000 // 253)


def _prefill_tokens(batch) -> dict[str, int]:
    return {r.request_id: r.num_tokens for r in batch.rows if r.is_prefill}


def test_arrivals_are_admitted_while_a_long_prompt_prefills():
    """A long prefill under way takes the whole budget only while nobody could be admitted: an
    arrival gets its prompt in the next step (the long one keeps what the arrival leaves), a prompt
    admitted beside the long one finishes in a few steps (fewest tokens left first, the oldest sure
    of an equal share), and a stream of arrivals never takes more than half from those under way."""
    sched, _ = make(num_slots=4, budget=256)
    sched.add(SchedRequest("long", prompt_len=10_000, max_tokens=4))
    assert _prefill_tokens(sched.schedule()) == {"long": 256}
    sched.add(SchedRequest("short", prompt_len=20, max_tokens=4))
    batch = sched.schedule()
    assert _prefill_tokens(batch) == {"long": 236, "short": 20}
    assert [r.request_id for r in batch.rows] == ["long", "short"]
    assert _prefill_tokens(sched.schedule()) == {"long": 255}  # one token for short's decode
    sched.add(SchedRequest("long2", prompt_len=5_000, max_tokens=4))
    assert _prefill_tokens(sched.schedule()) == {"long": 128, "long2": 127}
    both = _prefill_tokens(sched.schedule())  # both under way, nobody waiting: an equal share each
    assert sorted(both.values()) == [127, 128] and set(both) == {"long", "long2"}
    sched.abort("long2")
    sched.add(SchedRequest("medium", prompt_len=300, max_tokens=4))  # more than half the budget
    steps = 0
    while sched.running.get("medium") is None or sched.running["medium"].is_prefilling:
        sched.schedule()
        steps += 1
    assert steps == 3  # 127 on admission, then an equal share of the rest, not after all of "long"
    sched.abort("medium")
    sched.abort("short")
    for i in range(2):  # back-to-back arrivals of long prompts: those under way keep half, shared
        under_way = [r.request_id for r in sched.running.values() if r.is_prefilling]
        sched.add(SchedRequest(f"burst{i}", prompt_len=1_000, max_tokens=4))
        chunks = _prefill_tokens(sched.schedule())
        assert sum(chunks[r] for r in under_way) == 128 and chunks[f"burst{i}"] == 128
        assert chunks["long"] >= 128 // len(under_way)  # the oldest: at least an equal share


def test_equal_long_prompts_finish_one_after_another():
    """Four prompts of four budgets each, arriving together: they finish one after another, the last
    no later than in plain FCFS order, rather than all four at the end."""
    sched, _ = make(num_slots=4, budget=256)
    for i in range(4):
        sched.add(SchedRequest(f"p{i}", prompt_len=1024, max_tokens=1_000))
    done_at = {}
    for step in range(1, 40):
        sched.schedule()
        for rid, req in sched.running.items():
            if not req.is_prefilling:
                done_at.setdefault(rid, step)
        if len(done_at) == 4:
            break
    assert [done_at[f"p{i}"] for i in range(4)] == sorted(done_at.values())
    # FCFS alone: steps 4, 8, 12, 16; here the arrivals' first chunks come first (6, 10, 13, 17)
    assert done_at["p0"] <= 6 and done_at["p3"] <= 17


def test_fifo_admission_and_queueing_when_slots_exhausted():
    sched, slots = make(num_slots=2, budget=100)
    for i in range(5):
        sched.add(SchedRequest(f"r{i}", prompt_len=4, max_tokens=3))
    order = []
    max_tokens = {f"r{i}": 3 for i in range(5)}
    while sched.has_work():
        batch = sched.schedule()
        for r in batch.rows:
            if r.is_prefill and r.start == 0:
                order.append(r.request_id)
        assert slots.num_used <= 2
        finish_if_done(sched, batch, max_tokens)
    assert order == [f"r{i}" for i in range(5)]


def test_fifo_head_of_line_with_n_choices():
    sched, _ = make(num_slots=3, budget=100)
    sched.add(SchedRequest("a", prompt_len=4, max_tokens=5))
    sched.add(SchedRequest("b", prompt_len=4, max_tokens=5, num_choices=3))  # needs all 3 slots
    sched.add(SchedRequest("c", prompt_len=4, max_tokens=5))
    batch = sched.schedule()
    assert [r.request_id for r in batch.rows] == ["a"], "c must not jump ahead of b"


def test_n_choices_fork_and_decode_rows():
    sched, slots = make(num_slots=4, budget=100)
    sched.add(SchedRequest("a", prompt_len=5, max_tokens=3, num_choices=3))
    batch = sched.schedule()
    (row,) = batch.rows
    assert row.is_prefill and row.is_sampled and len(row.fork_to) == 2
    assert slots.num_used == 3
    batch = sched.schedule()
    assert sorted(r.choice for r in batch.rows) == [0, 1, 2]
    assert all(r.start == 5 for r in batch.rows)
    sched.finish_choice("a", 1)
    assert slots.num_used == 2
    batch = sched.schedule()
    assert sorted(r.choice for r in batch.rows) == [0, 2]
    assert all(r.start == 6 for r in batch.rows)


def test_abort_frees_slots_during_prefill_and_decode_and_waiting():
    sched, slots = make(num_slots=2, budget=4)
    sched.add(SchedRequest("p", prompt_len=100, max_tokens=3))
    sched.add(SchedRequest("d", prompt_len=2, max_tokens=30))
    sched.add(SchedRequest("w", prompt_len=2, max_tokens=30))
    sched.schedule()
    sched.schedule()
    assert sched.abort("p") is not None  # mid-prefill
    assert sched.abort("w") is not None  # still waiting
    sched.schedule()
    assert sched.abort("d") is not None  # decoding
    assert sched.abort("d") is None
    assert slots.num_free == 2 and not sched.has_work()
    slots.check()


def test_bounded_waiting_queue():
    sched, _ = make(num_slots=1, budget=8, max_waiting=2)
    sched.add(SchedRequest("a", prompt_len=4, max_tokens=1))
    sched.add(SchedRequest("b", prompt_len=4, max_tokens=1))
    with pytest.raises(QueueFull):
        sched.add(SchedRequest("c", prompt_len=4, max_tokens=1))


def test_random_workload_invariants():
    rng = random.Random(0)
    sched, slots = make(num_slots=4, budget=24)
    max_tokens = {}
    for step in range(400):
        if step < 200 and rng.random() < 0.3:
            rid = f"r{step}"
            max_tokens[rid] = rng.randint(1, 8)
            sched.add(
                SchedRequest(rid, rng.randint(1, 60), max_tokens[rid], num_choices=rng.choice([1, 1, 2]))
            )
        if rng.random() < 0.05 and sched.running:
            sched.abort(rng.choice(list(sched.running)))
        batch = sched.schedule()
        assert batch.num_tokens <= 24
        finish_if_done(sched, batch, max_tokens)
        slots.check()
        assert slots.num_used == sum(1 for r in sched.running.values() for s in r.slots if s >= 0)
    while sched.has_work():
        finish_if_done(sched, sched.schedule(), max_tokens)
    assert slots.num_free == 4


def test_scheduler_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, scheduler, cache.slots; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
