"""Prompt logprobs (SamplingParams.prompt_logprobs; `echo` with `logprobs` on /v1/completions): the
logprob of every prompt token under the model, computed chunk by chunk during prefill, equal to one
full forward of the prompt."""

from __future__ import annotations

import math

import pytest
import torch

from model.batch import BatchMeta
from model.state import allocate_state
from serving.llm import LLM
from serving.types import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_ckpt_dir) -> LLM:
    # a 16-token budget: a 40-token prompt is scored over three prefill chunks
    return LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", max_num_seqs=3, max_num_batched_tokens=16)


def _reference(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every prompt position, from one forward over the whole prompt."""
    model = llm.core.runner.model
    state = allocate_state(model.config.text, 1, torch.float32, model.dtype, "cpu")
    pos = torch.arange(len(prompt)).expand(3, -1)
    hidden = model(torch.tensor(prompt), pos, BatchMeta.build([0], [len(prompt)], [0]), state)
    return torch.log_softmax(model.compute_logits(hidden), dim=-1)


def _run(llm: LLM, prompt: list[int], params: SamplingParams) -> list:
    deltas: list = []
    req = llm.make_request(prompt, params)
    llm.core.validate(req)
    llm.core.add(req, deltas.append)
    while llm.core.scheduler.has_work():
        llm.core.step()
    return deltas


def test_prompt_logprobs_equal_one_full_forward(llm: LLM) -> None:
    prompt = [(7 * j) % 300 + 20 for j in range(40)]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, n=2, seed=1, prompt_logprobs=3)
    deltas = _run(llm, prompt, params)
    firsts = {d.index: d for d in reversed(deltas)}  # the first delta of each choice
    assert sorted(firsts) == [0, 1]
    entries = firsts[0].prompt_logprobs
    assert entries is firsts[1].prompt_logprobs and len(entries) == len(prompt)
    assert entries[0].chosen.token_id == prompt[0] and math.isnan(entries[0].chosen.logprob)
    assert entries[0].top == ()
    ref = _reference(llm, prompt)
    for j, e in enumerate(entries[1:]):
        assert e.chosen.token_id == prompt[j + 1]
        assert abs(e.chosen.logprob - ref[j, prompt[j + 1]].item()) < 1e-5, j
        top_v, top_i = ref[j].topk(3)
        assert [t.token_id for t in e.top] == top_i.tolist()
        assert all(abs(t.logprob - v) < 1e-5 for t, v in zip(e.top, top_v.tolist(), strict=True))
    later = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(later) == 2  # once per choice


def test_no_prompt_logprobs_unless_asked(llm: LLM) -> None:
    deltas = _run(llm, [5, 6, 7, 8], SamplingParams(max_tokens=2, temperature=0.0, logprobs=2))
    assert all(d.prompt_logprobs is None for d in deltas)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21).validate()
