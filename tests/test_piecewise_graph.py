"""serving.piecewise_graph: the stateless parts of a prefill step in segments over static, padded
buffers, the stateful mixes eagerly on the step's own tokens. On the CPU the segments run eagerly
(capture=False): the plumbing (buffers, padding, the order of reads and writes) against model.forward.
The captured graphs are tested on a GPU in tests/test_gpu_graph.py."""

from __future__ import annotations

import pytest
import torch
from model_helpers import clone_state, new_state, run_chunks, slot_rows, text_positions
from test_metrics import make_metrics, value

from model.batch import BatchMeta
from serving.metrics import STEP_MODES
from serving.piecewise_graph import PiecewiseGraphRunner

ATOL = 2e-4  # fp32: the same math on a padded number of rows


def _ids(n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("lens", [[5, 1, 1, 9], [16], [1, 1, 1], [7, 3]])
def test_segments_on_padded_buffers_equal_the_forward(tiny_model, lens: list[int]) -> None:
    """A mixed step (fresh prompts, continued ones, decode rows) through the segments, padded to the
    next size, twice in a row: the hidden states and the pool rows of model.forward, and no other
    slot touched; padding rows left over from a larger step before do not leak in."""
    vocab = tiny_model.config.text.vocab_size
    state = new_state(tiny_model, num_slots=6)
    state.recurrent[:, 5].normal_()  # an uninvolved slot with garbage: must stay untouched
    state.key[:, 5].normal_()
    slots = [3, 0, 2, 4][: len(lens)]
    history = {s: _ids(4 + s, s, vocab) for s in slots[1::2]}  # every other row continues a sequence
    for s, ids in history.items():
        run_chunks(tiny_model, ids, [ids.numel()], state, slot=s)
    ref_state = clone_state(state)
    runner = PiecewiseGraphRunner(tiny_model, state, "cpu", sizes=(8, 16, 32), capture=False)
    runner.forward(  # a larger step first: stale values in the padding rows of every buffer
        _ids(30, 99, vocab), text_positions(0, 30), BatchMeta.build([1], [30], [0]), None
    )
    run_chunks(tiny_model, _ids(30, 99, vocab), [30], ref_state, slot=1)
    untouched = slot_rows(state, 5)
    for step in range(2):
        ctx = [history[s].numel() + step * 20 if s in history else step * 20 for s in slots]
        ids = torch.cat([_ids(n, 10 * step + i, vocab) for i, n in enumerate(lens)])
        pos = torch.cat([text_positions(c, n) for c, n in zip(ctx, lens, strict=True)], dim=1)
        meta = BatchMeta.build(slots, lens, ctx)
        ref = tiny_model(ids, pos, meta, ref_state)
        out = runner.forward(ids, pos, meta)
        assert runner.padded_size(sum(lens)) >= sum(lens)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
        for s in slots:
            for a, b in zip(slot_rows(state, s), slot_rows(ref_state, s), strict=True):
                torch.testing.assert_close(a.float(), b.float(), atol=ATOL, rtol=1e-4)
        # pad each row's context for the next step (20 tokens on) with a chunk of 20
        for i, s in enumerate(slots):
            filler = _ids(20 - lens[i], 50 + i, vocab)
            if filler.numel():
                start = ctx[i] + lens[i]
                both = BatchMeta.build([s], [filler.numel()], [start])
                runner.forward(filler, text_positions(start, filler.numel()), both)
                tiny_model(filler, text_positions(start, filler.numel()), both, ref_state)
    for a, b in zip(untouched, slot_rows(state, 5), strict=True):
        assert torch.equal(a, b)


@torch.no_grad()
def test_inputs_embeds_and_size_limits(tiny_model) -> None:
    """Embeddings given instead of ids are used as they are; steps past the largest size are refused."""
    state = new_state(tiny_model, num_slots=2)
    ref_state = clone_state(state)
    runner = PiecewiseGraphRunner(tiny_model, state, "cpu", sizes=(4, 12), capture=False)
    assert runner.can_run(12) and not runner.can_run(13) and not runner.can_run(0)
    assert runner.padded_size(5) == 12 and runner.padded_size(4) == 4
    ids = _ids(6, 1, tiny_model.config.text.vocab_size)
    embeds = tiny_model.embed(ids) * 0.5
    meta = BatchMeta.build([0], [6], [0])
    out = runner.forward(ids, text_positions(0, 6), meta, inputs_embeds=embeds)
    ref = tiny_model(ids, text_positions(0, 6), meta, ref_state, inputs_embeds=embeds)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
    with pytest.raises(ValueError, match="positive"):
        PiecewiseGraphRunner(tiny_model, state, "cpu", sizes=(0, 4), capture=False)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_steps_through_the_segments_generate_the_same_tokens(tiny_ckpt_dir, async_scheduling) -> None:
    """The engine with the runner's prefill and mixed steps sent through the segments (eagerly, on
    the CPU): chunked prompts, an image, decode rows joining; greedy tokens as without. With async
    scheduling, decode rows take their input tokens from the step still in flight (on the device)."""
    import random

    from PIL import Image

    from serving.llm import LLM, Prompt
    from serving.types import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    rng = random.Random(4)
    image = Image.frombytes("RGB", (56, 84), bytes(rng.randrange(256) for _ in range(56 * 84 * 3)))
    prompts = [
        Prompt(messages=[{"role": "user", "content": "seven tiny robots sing about endless " * 3}]),
        Prompt(
            messages=[
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a lazy dog"}]}
            ],
            images=[image],
        ),
        Prompt(text="the quick brown fox jumps over"),
    ]
    runs = []
    engine = {"max_num_seqs": 4, "max_num_batched_tokens": 48, "async_scheduling": async_scheduling}
    for piecewise in (False, True):
        llm = LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", **engine)
        runner = llm.core.runner
        used: list[int] = []
        if piecewise:
            pw = PiecewiseGraphRunner(runner.model, runner.pool.state, "cpu", sizes=(8, 48), capture=False)
            real = pw.forward
            pw.forward = lambda ids, *a, seen=used, f=real, **kw: (
                seen.append(ids.shape[0]) or f(ids, *a, **kw)
            )
            runner.piecewise = pw
        llm.core.metrics = make_metrics()
        outs = llm.generate(prompts, params)
        runs.append([o.choices[0].token_ids for o in outs])
        steps = {m: value(llm.core.metrics, "infinitevl:engine_steps_total", mode=m) for m in STEP_MODES}
        if piecewise:
            assert len(used) > 3 and max(used) > 8  # every step with prefill rows went through them
            assert steps["piecewise"] == len(used) and steps["cuda_graph"] == 0  # counted as such
        else:
            assert steps["piecewise"] == 0 and steps["eager"] > 0
    assert runs[0] == runs[1]


def test_piecewise_flag_without_cuda_graphs_warns_and_runs_eagerly(tiny_ckpt_dir, caplog) -> None:
    import logging

    from serving.llm import LLM

    with caplog.at_level(logging.WARNING, logger="serving.build"):
        llm = LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", piecewise_graphs=True)
    assert llm.core.runner.piecewise is None
    assert any("--piecewise-graphs needs CUDA graphs" in r.getMessage() for r in caplog.records)


def test_piecewise_graphs_default_on_where_graphs_run_silent_elsewhere(tiny_ckpt_dir, caplog) -> None:
    """The default (None) captures them wherever decode CUDA graphs are captured, and says nothing
    where they are not (this CPU); the CLI maps --piecewise-graphs / --no-piecewise-graphs / nothing
    to True / False / None."""
    import argparse
    import logging

    from serving.cli import add_engine_args, engine_config_from_args
    from serving.llm import LLM

    with caplog.at_level(logging.WARNING, logger="serving.build"):
        llm = LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32")
    assert llm.config.piecewise_graphs is None and llm.core.runner.piecewise is None
    assert not any("piecewise" in r.getMessage() for r in caplog.records)
    p = argparse.ArgumentParser()
    add_engine_args(p)
    for argv, want in (([], None), (["--piecewise-graphs"], True), (["--no-piecewise-graphs"], False)):
        assert engine_config_from_args(p.parse_args(argv), "m").piecewise_graphs is want
    config = engine_config_from_args(p.parse_args(["--piecewise-max-tokens", "2048"]), "m")
    assert config.piecewise_max_tokens == 2048
    config = engine_config_from_args(p.parse_args(["--piecewise-max-tokens", "0"]), "m")
    with pytest.raises(ValueError, match="piecewise_max_tokens"):
        config.validate()


def test_capture_sizes_double_from_64_up_to_the_largest_step() -> None:
    """Powers of two from 64, then the largest step: min(step token budget, piecewise_max_tokens)."""
    from serving.piecewise_graph import capture_sizes

    assert capture_sizes(2048) == [64, 128, 256, 512, 1024, 2048]  # the default: the whole budget
    assert capture_sizes(2048, 1024) == [64, 128, 256, 512, 1024]
    assert capture_sizes(8192, 3000) == [64, 128, 256, 512, 1024, 2048, 3000]
    assert capture_sizes(100) == [64, 100]  # a small budget: no step is larger
    assert capture_sizes(48) == [48]
    with pytest.raises(ValueError, match="positive"):
        capture_sizes(2048, 0)
