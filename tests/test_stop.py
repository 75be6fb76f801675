"""Tests of serving.stop.ChoiceDecoder: eos/stop ids, stop strings, min/max tokens, streaming hold-back."""

from __future__ import annotations

import random
from typing import Any

import pytest

from serving.stop import ChoiceDecoder, StepResult
from serving.types import SamplingParams

try:
    from detokenizer_bpe import build_tokenizer, byte_token_ids
except ImportError:  # tests/ collected as a package
    from tests.detokenizer_bpe import build_tokenizer, byte_token_ids


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer()


def _eos(tok: Any) -> frozenset[int]:
    return frozenset({tok.convert_tokens_to_ids("<|im_end|>")})


def _run(tok: Any, ids: list[int], **params: Any) -> tuple[ChoiceDecoder, list[StepResult]]:
    """Feed ids until the choice finishes; check the streaming invariants on the way."""
    params.setdefault("max_tokens", 10_000)
    decoder = ChoiceDecoder(tok, SamplingParams(**params), _eos(tok))
    results = []
    for tid in ids:
        results.append(decoder.append(tid))
        if results[-1].finish_reason is not None:
            break
    assert "".join(r.text for r in results) == decoder.text
    assert all(r.finish_reason is None for r in results[:-1])
    return decoder, results


def test_eos_stops_without_its_text(tok: Any) -> None:
    ids = tok.encode("hello") + list(_eos(tok)) + tok.encode(" more")
    for skip in (True, False):
        decoder, results = _run(tok, ids, skip_special_tokens=skip)
        assert (results[-1].finish_reason, results[-1].stop_reason) == ("stop", None)
        assert decoder.text == "hello"
        assert decoder.num_tokens == len(tok.encode("hello")) + 1


def test_ignore_eos_runs_to_length(tok: Any) -> None:
    ids = tok.encode("hi") + list(_eos(tok)) + tok.encode(" there")
    decoder, results = _run(tok, ids, ignore_eos=True, max_tokens=len(ids), skip_special_tokens=False)
    assert results[-1].finish_reason == "length"
    assert decoder.text == "hi<|im_end|> there"


def test_stop_token_id(tok: Any) -> None:
    stop_id = tok.encode("fox")[0]
    ids = tok.encode("the quick ") + [stop_id] + tok.encode(" jumps")
    decoder, results = _run(tok, ids, stop_token_ids=(stop_id,))
    assert (results[-1].finish_reason, results[-1].stop_reason) == ("stop", stop_id)
    assert decoder.text == "the quick "


def test_max_tokens_gives_length(tok: Any) -> None:
    ids = byte_token_ids(tok, "abcdef")
    decoder, results = _run(tok, ids, max_tokens=4)
    assert len(results) == 4
    assert (results[-1].finish_reason, results[-1].stop_reason) == ("length", None)
    assert decoder.text == "abcd"


def test_length_flushes_held_back_text(tok: Any) -> None:
    decoder, results = _run(tok, byte_token_ids(tok, "abST"), stop=("STOP",), max_tokens=4)
    assert [r.text for r in results] == ["a", "b", "", "ST"]
    assert results[-1].finish_reason == "length"


def test_length_flushes_incomplete_character(tok: Any) -> None:
    decoder, results = _run(tok, byte_token_ids(tok, "a😀"), max_tokens=3)
    assert decoder.text == "a" + "😀".encode()[:2].decode("utf-8", errors="replace")


def test_stop_string_spanning_tokens(tok: Any) -> None:
    ids = byte_token_ids(tok, "Hello STOP world")
    decoder, results = _run(tok, ids, stop=("STOP",))
    assert (results[-1].finish_reason, results[-1].stop_reason) == ("stop", "STOP")
    assert decoder.text == "Hello "
    assert len(results) == len("Hello STOP")


def test_stop_string_natural_tokens_and_include(tok: Any) -> None:
    ids = tok.encode("stop here STOP there. END of story")
    decoder, _ = _run(tok, ids, stop=("END",))
    assert decoder.text == "stop here STOP there. "
    decoder, results = _run(tok, ids, stop=("END",), include_stop_str_in_output=True)
    assert decoder.text == "stop here STOP there. END"
    assert results[-1].stop_reason == "END"


def test_stop_string_at_very_start(tok: Any) -> None:
    decoder, results = _run(tok, byte_token_ids(tok, "STOP now"), stop=("STOP",))
    assert [r.text for r in results] == ["", "", "", ""]
    assert decoder.text == ""
    assert results[-1].finish_reason == "stop"


def test_partial_stop_string_held_then_released(tok: Any) -> None:
    decoder, results = _run(tok, byte_token_ids(tok, "aSTx"), stop=("STOP",))
    assert [r.text for r in results] == ["a", "", "", "STx"]
    assert decoder.finish_reason is None


def test_held_text_resumes_as_new_stop_prefix(tok: Any) -> None:
    # "SS": the first S can no longer start "STOP", the second still can
    _, results = _run(tok, byte_token_ids(tok, "SSTOQ"), stop=("STOP",))
    assert [r.text for r in results] == ["", "S", "", "", "STOQ"]


def test_overlapping_candidates_earliest_end_wins(tok: Any) -> None:
    for ids in (byte_token_ids(tok, "xabcd"), tok.encode("xabcd")):
        decoder, results = _run(tok, ids, stop=("abcd", "bc"))
        assert decoder.text == "xa"
        assert results[-1].stop_reason == "bc"
        decoder, results = _run(tok, ids, stop=("bc", "abc"))
        assert decoder.text == "x"
        assert results[-1].stop_reason == "abc"


def test_stop_string_with_multibyte_characters(tok: Any) -> None:
    for ids in (byte_token_ids(tok, "你好世界，世界"), tok.encode("你好世界，世界")):
        decoder, results = _run(tok, ids, stop=("世界，",))
        assert decoder.text == "你好"
        assert not any("\ufffd" in r.text for r in results)


def test_min_tokens_defers_all_stops(tok: Any) -> None:
    eos = list(_eos(tok))
    ids = byte_token_ids(tok, "STOP") + eos + byte_token_ids(tok, "ab") + eos
    decoder, results = _run(tok, ids, stop=("STOP",), min_tokens=6)
    assert len(results) == len(ids)
    assert decoder.text == "STOPab"
    assert (results[-1].finish_reason, results[-1].stop_reason) == ("stop", None)


def test_stop_string_completing_at_min_tokens(tok: Any) -> None:
    decoder, results = _run(tok, byte_token_ids(tok, "xSTOPy"), stop=("STOP",), min_tokens=5)
    assert decoder.text == "x"
    assert len(results) == 5


@pytest.mark.parametrize("text", ["café naïve 😀🎉 你好 ü 🦀 ñ", "emoji 😀 party 🎉 rocket 🚀"])
def test_utf8_split_across_tokens(tok: Any, text: str) -> None:
    for ids in (byte_token_ids(tok, text), tok.encode(text)):
        decoder, results = _run(tok, ids, max_tokens=len(ids), stop=("zz",))
        assert decoder.text == text
        assert not any("\ufffd" in r.text for r in results)
        assert results[-1].finish_reason == "length"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens_mid_stream(tok: Any, skip: bool) -> None:
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    ids = tok.encode("hello") + [im_start] + tok.encode(" world")
    decoder, _ = _run(tok, ids, max_tokens=len(ids), skip_special_tokens=skip)
    assert decoder.text == ("hello world" if skip else "hello<|im_start|> world")


def test_append_after_finish_raises(tok: Any) -> None:
    decoder, _ = _run(tok, byte_token_ids(tok, "ab"), max_tokens=1)
    with pytest.raises(RuntimeError):
        decoder.append(byte_token_ids(tok, "c")[0])


def _reference_cut(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Scan end positions left to right; the first stop ending there (longest on ties) cuts the text."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            stop = max(hits, key=len)
            return text[: end - len(stop)], stop
    return text, None


def test_random_texts_against_reference(tok: Any) -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abS T") for _ in range(rng.randint(0, 14)))
        stops = tuple(
            sorted({"".join(rng.choice("abST") for _ in range(rng.randint(1, 3))) for _ in range(2)})
        )
        expected, reason = _reference_cut(text, stops)
        for ids in (byte_token_ids(tok, text), tok.encode(text)):
            if not ids:
                continue
            decoder, results = _run(tok, ids, stop=stops, max_tokens=len(ids))
            assert decoder.text == expected, (text, stops)
            assert results[-1].stop_reason == reason
            assert results[-1].finish_reason == ("stop" if reason else "length")


@pytest.mark.parametrize("seed", range(6))
def test_finishes_with_predicts_append(tok: Any, seed: int) -> None:
    """Without stop strings, `finishes_with(t)` (no detokenization) says whether `append(t)` finishes
    the choice: eos and stop ids, min_tokens holding them back, max_tokens, ignore_eos."""
    rng = random.Random(seed)
    eos = next(iter(_eos(tok)))
    max_tokens = rng.randrange(1, 40)
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=min(rng.randrange(0, 6), max_tokens),
        stop_token_ids=[rng.randrange(len(tok))],
        ignore_eos=rng.random() < 0.3,
    )
    decoder = ChoiceDecoder(tok, params, _eos(tok))
    assert not decoder.ends_on_text
    specials = [eos, *params.stop_token_ids]
    while not decoder.is_finished:
        tid = rng.choice(specials) if rng.random() < 0.15 else rng.randrange(len(tok))
        predicted = decoder.finishes_with(tid)
        assert predicted == (decoder.append(tid).finish_reason is not None)
    assert ChoiceDecoder(tok, SamplingParams(stop=["x"]), _eos(tok)).ends_on_text
