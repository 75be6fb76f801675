"""CPU tests of serving.sampler: each processor against a hand computation, support and seeding."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from serving.sampler import (
    SampleOutput,
    Sampler,
    SamplingRow,
    apply_penalties,
    make_generator,
)
from serving.types import SamplingParams

PROBS = [0.5, 0.3, 0.15, 0.05]  # hand-picked distribution used by the support tests


def _row(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: frozenset[int] = frozenset(),
    choice: int = 0,
    **params: object,
) -> SamplingRow:
    sp = SamplingParams(**params)  # type: ignore[arg-type]
    gen = make_generator(sp.seed, "cpu", choice) if sp.seed is not None else None
    return SamplingRow(sp, prompt or [], list(output or []), gen, eos)


def _sample_many(logits: torch.Tensor, n: int, **params: object) -> Counter[int]:
    """Draw n tokens from one distribution (n identical unseeded rows, fixed shared generator)."""
    sampler = Sampler(generator=torch.Generator().manual_seed(1234))
    rows = [_row(**params) for _ in range(n)]
    out = sampler(logits.expand(n, -1).contiguous(), rows)
    return Counter(out.token_ids)


def _log_probs() -> torch.Tensor:
    return torch.tensor([math.log(p) for p in PROBS]).unsqueeze(0)


def test_greedy_is_argmax_with_ties_to_lowest_id() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, -1.0, 5.0, 2.0], [-2.0, -3.0, -1.0, -1.5]])
    rows = [_row(temperature=0.0) for _ in range(3)]
    out = Sampler()(logits, rows)
    assert out.token_ids == [1, 0, 2]
    assert out.logprobs == [None, None, None]


def test_greedy_random_logits_matches_argmax() -> None:
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, [_row(temperature=0.0) for _ in range(8)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_one_equals_greedy() -> None:
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(1))
    rows = [_row(temperature=1.3, top_k=1, seed=s) for s in range(6)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_input_logits_not_modified() -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    rows = [
        _row(output=[1, 2], repetition_penalty=1.5, frequency_penalty=1.0, logit_bias={3: 5.0}),
        _row(top_p=0.5, min_p=0.1, top_k=4, seed=3),
    ]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


def test_input_logits_not_modified_without_processors() -> None:
    """No row has bias, min_tokens or penalties: the selection runs on the input itself (no copy)
    and must not write to it, whatever the warpers."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(5))
    before = logits.clone()
    rows = [
        _row(temperature=0.0),
        _row(temperature=0.7, top_p=0.5, seed=1),
        _row(temperature=1.5, top_k=3, min_p=0.05, seed=2),
        _row(output=[1, 2, 3], min_tokens=2, seed=3),  # min_tokens already met
    ]
    out = Sampler()(logits, rows)
    assert torch.equal(logits, before)
    assert out.token_ids[0] == int(before[0].argmax())


def test_logit_bias_forces_token() -> None:
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(3))
    rows = [_row(temperature=0.0, logit_bias={42: 100.0}), _row(seed=7, logit_bias={17: 100.0})]
    assert Sampler()(logits, rows).token_ids == [42, 17]


def test_logit_bias_hand_computation() -> None:
    # bias -3 on the current argmax (5.0 -> 2.0) makes token 2 (4.0) the greedy choice
    logits = torch.tensor([[1.0, 5.0, 4.0, 0.0]])
    assert Sampler()(logits, [_row(temperature=0.0, logit_bias={1: -3.0})]).token_ids == [2]
    assert Sampler()(logits, [_row(temperature=0.0, logit_bias={1: -0.5})]).token_ids == [1]


def test_min_tokens_blocks_eos_and_stop_token_ids() -> None:
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]])  # eos 2 is the argmax, stop id 3 next
    eos = frozenset({2})
    params = dict(temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    for num_out in (0, 1):
        out = Sampler()(logits, [_row(output=[4] * num_out, eos=eos, **params)])
        assert out.token_ids == [4]
    assert Sampler()(logits, [_row(output=[4, 4], eos=eos, **params)]).token_ids == [2]


def test_min_tokens_blocks_eos_when_sampling() -> None:
    logits = torch.tensor([[5.0, 5.0, 0.0]])
    counts = _sample_many(logits, 500, min_tokens=1, eos=frozenset({0}))
    assert set(counts) == {1, 2}


def test_repetition_penalty_hand_computation() -> None:
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 4.0]])
    row = _row(prompt=[0, 1], output=[2], repetition_penalty=2.0)
    apply_penalties(logits, [row])
    # seen tokens 0, 1 (prompt) and 2 (output): positive halved, negative doubled; 3 and 4 unseen
    assert logits.tolist() == [[1.0, -4.0, 1.5, -1.0, 4.0]]


def test_frequency_and_presence_penalties_hand_computation() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    row = _row(prompt=[3], output=[0, 0, 0, 1], frequency_penalty=0.5, presence_penalty=0.25)
    apply_penalties(logits, [row])
    # token 0: 1 - 3*0.5 - 0.25; token 1: 1 - 0.5 - 0.25; token 3 is only in the prompt: untouched
    assert logits.tolist() == [[-0.75, 0.25, 1.0, 1.0]]


def test_penalty_counts_follow_appended_outputs() -> None:
    row = _row(output=[1], frequency_penalty=1.0)
    first = torch.zeros(1, 3)
    apply_penalties(first, [row])
    assert first.tolist() == [[0.0, -1.0, 0.0]]
    row.output_token_ids.extend([1, 2])
    second = torch.zeros(1, 3)
    apply_penalties(second, [row])
    assert second.tolist() == [[0.0, -2.0, -1.0]]


def test_penalties_only_touch_their_rows() -> None:
    logits = torch.ones(2, 3)
    apply_penalties(logits, [_row(output=[0]), _row(output=[0], presence_penalty=1.0)])
    assert logits.tolist() == [[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0]])
    assert Sampler()(logits, [_row(output=[0], temperature=0.0, repetition_penalty=2.0)]).token_ids == [1]


def test_top_k_restricts_support() -> None:
    counts = _sample_many(_log_probs(), 2000, top_k=2)
    assert set(counts) == {0, 1}


def test_top_p_restricts_support() -> None:
    # mass of better tokens: 0, 0.5, 0.8, 0.95 -> top_p 0.7 keeps tokens 0 and 1
    counts = _sample_many(_log_probs(), 2000, top_p=0.7)
    assert set(counts) == {0, 1}
    counts = _sample_many(_log_probs(), 2000, top_p=0.4)
    assert set(counts) == {0}


def test_min_p_restricts_support() -> None:
    # min_p 0.2 * max prob 0.5 = 0.1: tokens with p >= 0.1 survive
    counts = _sample_many(_log_probs(), 2000, min_p=0.2)
    assert set(counts) == {0, 1, 2}


@pytest.mark.parametrize("params", [{"temperature": 1e-45}, {"temperature": 1e-300}, {"top_p": 1e-46}])
def test_vanishing_temperature_or_top_p_is_greedy(params: dict[str, float]) -> None:
    """A temperature or top_p that the API accepts (> 0) but that is 0 or tiny in float32 keeps the most
    likely token: logits / 1e-45 are infinite and top_p 1e-46 is 0.0 in float32, which would leave no
    token or NaN scores (token 0 came out)."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    counts = _sample_many(logits, 50, **params)
    assert set(counts) == {1}


def test_temperature_then_top_p() -> None:
    # temperature 0.5 squares the odds: probs proportional to 0.25, 0.09, 0.0225, 0.0025
    # -> normalised about 0.6965, 0.2507, 0.0627, 0.0070; top_p 0.9: mass before token 2 is 0.947 -> removed
    counts = _sample_many(_log_probs(), 2000, temperature=0.5, top_p=0.9)
    assert set(counts) == {0, 1}


def test_sampling_frequencies_follow_distribution() -> None:
    n = 20000
    counts = _sample_many(_log_probs(), n)
    for tok, p in enumerate(PROBS):
        assert abs(counts[tok] / n - p) < 0.02


def test_top_k_renormalises_kept_tokens() -> None:
    n = 20000
    counts = _sample_many(_log_probs(), n, top_k=2)
    assert abs(counts[0] / n - 0.5 / 0.8) < 0.02


def _run_steps(sampler: Sampler, rows: list[SamplingRow], target: int, steps: int, seed: int) -> list[int]:
    """Run `steps` decode steps with random logits; return the tokens of rows[target]."""
    gen = torch.Generator().manual_seed(seed)
    target_logits = torch.Generator().manual_seed(99)
    got = []
    for _ in range(steps):
        logits = torch.randn(len(rows), 64, generator=gen)
        logits[target] = torch.randn(64, generator=target_logits)
        out = sampler(logits, rows)
        for row, tok in zip(rows, out.token_ids, strict=True):
            row.output_token_ids.append(tok)
        got.append(out.token_ids[target])
    return got


def test_seeded_row_independent_of_batch() -> None:
    params = dict(seed=5, temperature=1.5, top_p=0.9, top_k=40)
    alone = _run_steps(Sampler(), [_row(**params)], 0, 12, seed=0)
    others = [_row(seed=1), _row(), _row(temperature=0.0), _row(top_k=3)]
    mixed = others[:2] + [_row(**params)] + others[2:]
    together = _run_steps(Sampler(generator=torch.Generator().manual_seed(3)), mixed, 2, 12, seed=1)
    assert together == alone
    first = [_row(**params), _row(min_p=0.1)]
    assert _run_steps(Sampler(), first, 0, 12, seed=2) == alone


def test_seeded_choices_differ_and_reproduce() -> None:
    logits = torch.zeros(1, 1000)  # uniform: different generators almost surely differ

    def draws(choice: int) -> list[int]:
        row = _row(seed=11, choice=choice)
        return [Sampler()(logits, [row]).token_ids[0] for _ in range(5)]

    assert draws(0) == draws(0)
    assert draws(1) == draws(1)
    assert draws(0) != draws(1)


def test_make_generator_choice_zero_uses_seed() -> None:
    a = make_generator(123, "cpu").initial_seed()
    assert a == 123
    assert make_generator(123, "cpu", 1).initial_seed() != make_generator(124, "cpu", 0).initial_seed()
    assert make_generator(-1, "cpu").initial_seed() == (1 << 64) - 1


def test_logprobs_match_log_softmax_of_raw_logits() -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(4))
    rows = [
        _row(temperature=0.0, logprobs=5, logit_bias={7: 50.0}),
        _row(seed=2, logprobs=0),
        _row(seed=3),
    ]
    out = Sampler()(logits, rows)
    assert isinstance(out, SampleOutput)
    expected = torch.log_softmax(logits, dim=-1)
    assert out.token_ids[0] == 7
    chosen, top = out.logprobs[0]
    assert chosen == pytest.approx(expected[0, 7].item(), abs=1e-6)
    ref_vals, ref_ids = expected[0].sort(descending=True)
    assert [t for t, _ in top] == ref_ids[:5].tolist()
    assert [v for _, v in top] == pytest.approx(ref_vals[:5].tolist(), abs=1e-6)
    chosen1, top1 = out.logprobs[1]
    assert chosen1 == pytest.approx(expected[1, out.token_ids[1]].item(), abs=1e-6)
    assert top1 == []
    assert out.logprobs[2] is None


def test_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), [_row()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rows_match_cpu_semantics() -> None:
    device = torch.device("cuda")
    logits = torch.randn(4, 32000, generator=torch.Generator().manual_seed(5)).to(device)
    params = dict(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.2)

    def seeded_row() -> SamplingRow:
        return SamplingRow(SamplingParams(seed=9, **params), [1, 2, 3], [4], make_generator(9, device))

    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logprobs=3, logit_bias={7: 1.0}), [1], []),
        seeded_row(),
        SamplingRow(SamplingParams(frequency_penalty=0.5), [1], [2, 2]),
        SamplingRow(SamplingParams(min_tokens=2), [1], [], None, frozenset({0})),
    ]
    out = Sampler()(logits, rows)
    biased = logits[0].clone()
    biased[7] += 1.0
    assert out.token_ids[0] == int(biased.argmax())
    assert out.logprobs[0] is not None and len(out.logprobs[0][1]) == 3
    alone = Sampler()(logits[1:2], [seeded_row()])
    assert alone.token_ids[0] == out.token_ids[1]
    assert out.token_ids[3] != 0


def test_top_k_per_row_values_with_disabled_rows() -> None:
    # rows with different k (and one disabled) in one batch; ties with the k-th value are kept
    logits = torch.tensor([[4.0, 3.0, 3.0, 1.0, 0.0]]).expand(3, -1).contiguous()
    gen = torch.Generator().manual_seed(0)
    seen: list[set[int]] = [set(), set(), set()]
    params = [dict(top_k=3), dict(top_k=2), dict(top_k=0)]
    for _ in range(400):
        rows = [_row(**p) for p in params]
        out = Sampler(generator=gen)(logits, rows)
        for i, tok in enumerate(out.token_ids):
            seen[i].add(tok)
    assert seen[0] == {0, 1, 2}
    assert seen[1] == {0, 1, 2}  # k=2: token 2 ties with the 2nd value 3.0
    assert seen[2] == {0, 1, 2, 3, 4}
