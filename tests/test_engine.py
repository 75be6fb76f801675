"""Engine tests on the tiny checkpoint: batch invariance, seeds, n > 1, aborts, queueing, stops, faults."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest
import torch
from PIL import Image

from serving.engine import AsyncEngine
from serving.llm import LLM, Prompt
from serving.types import GenerateRequest, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_ckpt_dir) -> LLM:
    # fp32 weights: the torch backend is then batch invariant up to fp32 rounding
    return LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=24)


@pytest.fixture(autouse=True)
def pool_integrity(request):
    yield
    if "llm" in request.fixturenames:
        core = request.getfixturevalue("llm").core
        assert not core.requests, "a request was left behind"
        core.check()
        assert core.pool.num_free == core.pool.num_slots


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def random_image(rng: random.Random) -> Image.Image:
    w, h = rng.choice([(56, 56), (84, 56), (56, 112)])
    data = bytes(rng.randrange(256) for _ in range(w * h * 3))
    return Image.frombytes("RGB", (w, h), data)


WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "tiny",
    "robots",
    "sing",
    "about",
    "endless",
    "rivers",
]


def random_prompt(rng: random.Random, with_image: bool) -> Prompt:
    n = rng.choice([2, 5, 12, 30])  # words; longer ones cross the 16-token window
    text = " ".join(rng.choice(WORDS) for _ in range(n))
    if with_image:
        content = [{"type": "image"}, {"type": "text", "text": text}]
        return Prompt(messages=[{"role": "user", "content": content}], images=[random_image(rng)])
    return Prompt(messages=[{"role": "user", "content": text}])


def test_batch_invariance_32_requests(llm):
    rng = random.Random(1234)
    prompts = [random_prompt(rng, with_image=(i % 4 == 0)) for i in range(32)]
    params = [greedy(rng.randint(1, 12)) for _ in range(32)]
    reqs = [llm.make_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    assert any(len(r.prompt_token_ids) > 16 * 3 for r in reqs), (
        "some prompts must be far longer than the window"
    )
    alone = [
        llm.run_requests([r])[0]
        for r in [llm.make_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    ]
    arrivals = sorted(rng.randint(0, 60) for _ in range(32))
    together = llm.run_requests(reqs, arrival_steps=arrivals)
    for a, t, sp in zip(alone, together, params, strict=True):
        assert t.choices[0].token_ids == a.choices[0].token_ids
        assert len(t.choices[0].token_ids) == sp.max_tokens
        assert t.choices[0].finish_reason == "length"


def test_seeded_sampling_reproducible_under_concurrency(llm):
    rng = random.Random(7)
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=42, ignore_eos=True)
    target = Prompt(messages=[{"role": "user", "content": "seven tiny robots"}])
    alone = llm.run_requests([llm.make_request(target, sp)])[0].choices[0].token_ids
    others = [
        llm.make_request(random_prompt(rng, False), SamplingParams(temperature=1.0, max_tokens=8))
        for _ in range(6)
    ]
    mixed = llm.run_requests(
        [*others[:3], llm.make_request(target, sp), *others[3:]], arrival_steps=[0, 0, 1, 2, 2, 3, 5]
    )
    assert mixed[3].choices[0].token_ids == alone
    different = llm.run_requests([llm.make_request(target, replace(sp, seed=43))])[0].choices[0].token_ids
    assert different != alone  # a different seed gives different samples (10 tokens, vocab of thousands)


def test_n3_three_choices_from_one_prefill(llm):
    prompt = Prompt(messages=[{"role": "user", "content": "the lazy dog"}])
    sp = SamplingParams(temperature=1.0, max_tokens=6, seed=5, n=3, ignore_eos=True)
    req = llm.make_request(prompt, sp)
    prefill_rows = []
    orig = llm.core.scheduler.schedule

    def spy():
        batch = orig()
        prefill_rows.extend(r for r in batch.rows if r.is_prefill)
        return batch

    llm.core.scheduler.schedule = spy
    try:
        out = llm.run_requests([req])[0]
    finally:
        llm.core.scheduler.schedule = orig
    assert len(out.choices) == 3
    assert sum(r.num_tokens for r in prefill_rows) == len(req.prompt_token_ids), (
        "the prompt is prefilled once"
    )
    assert all(len(c.token_ids) == 6 for c in out.choices)
    assert len({tuple(c.token_ids) for c in out.choices}) > 1
    # greedy n=2: both choices equal the single greedy answer (forked state is an exact copy)
    g = llm.run_requests([llm.make_request(prompt, greedy(6, n=2))])[0]
    single = llm.run_requests([llm.make_request(prompt, greedy(6))])[0]
    assert g.choices[0].token_ids == g.choices[1].token_ids == single.choices[0].token_ids


def test_abort_during_prefill_and_decode_frees_slot(llm):
    core = llm.core
    long_text = " ".join(WORDS * 6)
    got = {}
    r1 = llm.make_request(Prompt(messages=[{"role": "user", "content": long_text}]), greedy(50))
    r2 = llm.make_request(Prompt(messages=[{"role": "user", "content": "hi"}]), greedy(50))
    for r in (r1, r2):
        core.validate(r)
        core.add(r, lambda d, rid=r.request_id: got.setdefault(rid, []).append(d))
    core.step()
    assert core.scheduler.running[r1.request_id].is_prefilling
    core.abort(r1.request_id)  # mid-prefill
    for _ in range(3):
        core.step()
    assert not core.scheduler.running[r2.request_id].is_prefilling
    core.abort(r2.request_id)  # mid-decode
    assert got[r1.request_id][-1].finish_reason == "abort"
    assert got[r2.request_id][-1].finish_reason == "abort"
    assert core.pool.num_free == core.pool.num_slots


def test_slot_exhaustion_queues_instead_of_failing(llm):
    reqs = [llm.make_request(f"request number {i}", greedy(3)) for i in range(10)]
    outs = llm.run_requests(reqs)
    assert all(o.error is None and len(o.choices[0].token_ids) == 3 for o in outs)


def test_stop_token_ids_and_stop_strings(llm):
    prompt = Prompt(messages=[{"role": "user", "content": "quick brown fox"}])
    base = llm.run_requests([llm.make_request(prompt, greedy(12))])[0].choices[0]
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    out = llm.run_requests([llm.make_request(prompt, greedy(12, stop_token_ids=(stop_id,)))])[0].choices[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == base.token_ids[: first + 1]
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        out = llm.run_requests([llm.make_request(prompt, greedy(12, stop=(stop,)))])[0].choices[0]
        assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]


def test_eos_stops_unless_ignored(llm):
    eos = min(llm.core.eos_token_ids)
    prompt = Prompt(messages=[{"role": "user", "content": "over a lazy"}])
    biased = SamplingParams(temperature=0.0, max_tokens=5, logit_bias={eos: 100.0})
    out = llm.run_requests([llm.make_request(prompt, biased)])[0].choices[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 1 and out.text == ""
    out = llm.run_requests([llm.make_request(prompt, replace(biased, ignore_eos=True))])[0].choices[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    out = llm.run_requests([llm.make_request(prompt, replace(biased, min_tokens=3))])[0].choices[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "stop"


def test_logprobs(llm):
    out = llm.run_requests([llm.make_request("fox", greedy(4, logprobs=3))])[0].choices[0]
    assert len(out.logprobs) == 4
    for tok, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry.chosen.token_id == tok
        assert len(entry.top) == 3 and entry.top[0].logprob >= entry.top[-1].logprob
        assert entry.chosen.logprob <= 0.0 and abs(entry.top[0].logprob - entry.chosen.logprob) < 1e-5


def test_fault_in_one_request_fails_it_cleanly(llm):
    core = llm.core
    bad = llm.make_request("this one breaks", greedy(5))
    good = [llm.make_request(f"fine request {i}", greedy(5)) for i in range(3)]
    expected = [llm.run_requests([llm.make_request(f"fine request {i}", greedy(5))])[0] for i in range(3)]

    def hook(er):
        if er.request_id == bad.request_id:
            raise RuntimeError("injected fault")

    core.fault_hook = hook
    try:
        outs = llm.run_requests([good[0], bad, good[1], good[2]])
    finally:
        core.fault_hook = None
    assert outs[1].choices[0].finish_reason == "error" and outs[1].error
    for o, e in zip([outs[0], outs[2], outs[3]], expected, strict=True):
        assert o.choices[0].token_ids == e.choices[0].token_ids


def test_limits_rejected_with_clear_errors(llm):
    core = llm.core
    req = llm.make_request("hello", greedy(4))
    with pytest.raises(ValueError, match="max_tokens"):
        core.validate(replace(req, sampling=replace(req.sampling, max_tokens=10**9)))
    with pytest.raises(ValueError, match="n="):
        core.validate(replace(req, sampling=replace(req.sampling, n=99)))
    with pytest.raises(ValueError, match="prompt"):
        core.validate(replace(req, prompt_token_ids=[], positions=torch.zeros(3, 0, dtype=torch.int64)))


def test_async_engine_stream_and_disconnect_abort(llm):
    core = llm.core
    eng = AsyncEngine(core)
    eng.start()

    async def main():
        req = llm.make_request("stream me", greedy(6))
        deltas = [d async for d in eng.generate(req)]
        assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 6
        assert sum(len(d.token_ids) for d in deltas) == 6
        long = llm.make_request("never ending", greedy(10_000))
        it = eng.generate(long)
        async for _ in it:
            break
        await it.aclose()  # the client went away
        for _ in range(100):
            if not core.requests:
                break
            await asyncio.sleep(0.05)
        assert not core.requests

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()


def test_request_with_image_and_long_prompt_matches_unchunked(tiny_ckpt_dir):
    """Chunked prefill of a multimodal prompt (budget 8) gives the tokens of a single-chunk prefill."""
    rng = random.Random(3)
    prompt = random_prompt(rng, with_image=True)
    small = LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", max_num_seqs=2, max_num_batched_tokens=8)
    big = LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", max_num_seqs=2, max_num_batched_tokens=4096)
    a = small.run_requests([small.make_request(prompt, greedy(8))])[0].choices[0].token_ids
    b = big.run_requests([big.make_request(prompt, greedy(8))])[0].choices[0].token_ids
    assert a == b


def test_generate_request_positions_shape_checked(llm):
    req = llm.make_request("abc", greedy(2))
    bad = GenerateRequest("x", req.prompt_token_ids, torch.zeros(3, 1, dtype=torch.int64), 0, req.sampling)
    with pytest.raises(ValueError, match="positions"):
        llm.core.validate(bad)


def test_coalesce_merges_a_choices_backlog_in_order():
    from serving.engine import coalesce
    from serving.types import Delta, LogprobEntry, TokenLogprob, Usage

    def lp(t: int) -> tuple[LogprobEntry, ...]:
        return (LogprobEntry(TokenLogprob(t, str(t), -1.0), ()),)

    err = RuntimeError("boom")
    items = [
        Delta("r", 0, "a", (1,), lp(1)),
        Delta("r", 1, "x", (7,), lp(7)),
        Delta("r", 0, "b", (2,), lp(2)),
        Delta("r", 0, "c", (3,), lp(3), finish_reason="stop", usage=Usage(5, 3)),
        Delta("r", 0, "late", (4,)),  # never merged into a finished delta
        err,
        Delta("r", 1, "y", (8,), lp(8)),
    ]
    out = coalesce(items)
    assert [getattr(d, "text", None) for d in out] == ["a", "x", "bc", "late", None, "y"]
    merged = out[2]
    assert merged.token_ids == (2, 3) and merged.finish_reason == "stop" and merged.usage == Usage(5, 3)
    assert [e.chosen.token_id for e in merged.logprobs] == [2, 3]
    assert out[4] is err


def test_slow_consumer_gets_whole_text(llm):
    core = llm.core
    eng = AsyncEngine(core)
    eng.start()

    async def main():
        req = llm.make_request("a slow reader", greedy(12))
        alone = llm.make_request("a slow reader", greedy(12))
        deltas = []
        async for d in eng.generate(req):
            deltas.append(d)
            await asyncio.sleep(0.2)  # fall behind the engine: the backlog arrives merged
        return deltas, alone

    try:
        deltas, alone = asyncio.run(main())
    finally:
        eng.shutdown()
    expected = llm.run_requests([alone])[0].choices[0]
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text
    assert deltas[-1].finish_reason == "length"
    assert len(deltas) < 12, "a lagging consumer receives merged deltas"
