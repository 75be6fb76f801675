"""Legacy completions logprobs (api.logprobs): the sampled token is always among `top_logprobs`, tokens that
are part of a character are named by their bytes, and `text_offset` indexes the returned `text`, streamed
or not."""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import random
from dataclasses import replace

import openapi_validator as oav
import pytest

from api.logprobs import TextOffsets, legacy_logprobs, legacy_token
from api.responses import ChoiceResult, StreamSpec, completion_response, completion_stream
from serving.types import Delta, LogprobEntry, TokenLogprob, Usage

# ---- top_logprobs --------------------------------------------------------------------------------------


def tok(token_id: int, raw: bytes, logprob: float) -> TokenLogprob:
    return TokenLogprob(token_id, raw.decode("utf-8", "replace"), logprob, list(raw))


def entry(chosen: TokenLogprob, *top: TokenLogprob) -> LogprobEntry:
    return LogprobEntry(chosen, top)


def test_top_logprobs_hold_the_sampled_token():
    """Up to logprobs + 1 alternatives: the top ones and the sampled token, also with logprobs 0 (the
    sampled token alone) and for an echoed prompt's tokens (the first has nulls)."""
    a, b, c = tok(1, b"a", -0.5), tok(2, b"b", -1.0), tok(3, b"c", -3.0)
    out = legacy_logprobs(
        [
            entry(tok(0, b"x", math.nan)),  # an echoed prompt's first token
            entry(a),  # logprobs 0
            entry(c, a, b),  # sampled outside the top 2
            entry(b, a, b),  # sampled inside the top 2
        ],
        [0, 1, 2, 3],
    )
    assert out.token_logprobs == [None, -0.5, -3.0, -1.0]
    assert out.top_logprobs == [None, {"a": -0.5}, {"a": -0.5, "b": -1.0, "c": -3.0}, {"a": -0.5, "b": -1.0}]


def test_tokens_inside_a_character_are_named_by_their_bytes():
    """As OpenAI's legacy API: "bytes:\\xe6\\x97", so different byte tokens are different keys."""
    first, second = tok(5, b"\xe6\x97", -0.1), tok(6, b"\xa5", -0.2)
    other = tok(7, b"\xe6\x9c", -2.0)
    out = legacy_logprobs([entry(first, first, other), entry(second, second)], [0, 0])
    assert out.tokens == ["bytes:\\xe6\\x97", "bytes:\\xa5"]
    assert out.top_logprobs[0] == {"bytes:\\xe6\\x97": -0.1, "bytes:\\xe6\\x9c": -2.0}
    assert legacy_token(tok(8, "日".encode(), 0.0)) == "日"
    assert legacy_token(TokenLogprob(9, "<|im_end|>", 0.0, None)) == "<|im_end|>"


# ---- text_offset ---------------------------------------------------------------------------------------


def char_of_byte(text: str, raws: list[bytes]) -> list[int]:
    """The reference: the index of the character holding each token's first byte (len(text) past it)."""
    holder = [i for i, ch in enumerate(text) for _ in ch.encode()] + [len(text)]
    starts = [sum(len(r) for r in raws[:i]) for i in range(len(raws))]
    return [holder[min(pos, len(holder) - 1)] for pos in starts]


def released(raws: list[bytes]) -> list[str]:
    """The text each token releases, as the engine's detokenizer streams it (whole characters only)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    return [decoder.decode(raw) for raw in raws[:-1]] + [decoder.decode(raws[-1], final=True)]


def streamed(pieces: list[str], raws: list[bytes], start: int = 0) -> list[int]:
    offsets = TextOffsets(start)
    return [at for piece, raw in zip(pieces, raws, strict=True) for at in offsets.offsets(piece, [raw])]


TEXT = "héllo 日本語 🙂 ok"


def byte_tokens(text: str) -> list[bytes]:
    """The review's case as the tiny checkpoint's tokenizer splits it: é, 日, 本, 語 and 🙂 byte by byte."""
    raws: list[bytes] = []
    for word in text.split(" "):
        ascii_word = word.isascii()
        pieces = [word.encode()] if ascii_word else [bytes([b]) for b in word.encode()]
        raws += ([b" "] if raws else []) + pieces
    return raws


def test_offsets_of_byte_tokens_index_the_text():
    raws = byte_tokens(TEXT)
    whole = TextOffsets().offsets(TEXT, raws)
    assert whole == char_of_byte(TEXT, raws)
    assert whole[raws.index(b"ok")] == TEXT.index("ok")
    assert whole[1:3] == [1, 1]  # both bytes of é start where é does
    assert streamed(released(raws), raws) == whole


@pytest.mark.parametrize("seed", range(20))
def test_offsets_of_random_splits(seed: int):
    """Any text cut anywhere into tokens: offsets are the character holding each token's first byte,
    streamed (text released one whole character at a time) or not, from any start."""
    rng = random.Random(seed)
    alphabet = "ab é日🙂\n\u0301"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
    data = text.encode()
    cuts = sorted(set(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, len(data))))))
    raws = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    expected = char_of_byte(text, raws)
    assert TextOffsets().offsets(text, raws) == expected
    assert streamed(released(raws), raws) == expected
    assert TextOffsets(7).offsets(text, raws) == [7 + x for x in expected]


def test_a_token_left_out_of_the_text_has_zero_width():
    """A special token the text skips (skip_special_tokens) sits where it would be, streamed or not."""
    raws = [b"a", b"<|quad_end|>", b" b", b"<|im_end|>"]
    pieces = ["a", "", " b", ""]
    assert TextOffsets().offsets("a b", raws) == [0, 1, 1, 3]
    assert streamed(pieces, raws) == [0, 1, 1, 3]
    kept = TextOffsets().offsets("a<|quad_end|> b", raws[:3])  # skip_special_tokens false: in the text
    assert kept == [0, 1, 13]


def test_invalid_bytes_and_a_cut_stop_string():
    """Bytes that are no UTF-8 decode to U+FFFD: the next token starts after it. A token whose text was
    cut by a stop string starts where its kept part does."""
    raws = [b"\xe6", b"a", b" b"]
    assert TextOffsets().offsets("\ufffda b", raws) == [0, 1, 2]
    assert streamed(["", "\ufffda", " b"], raws) == [0, 1, 2]
    assert TextOffsets().offsets("x he", [b"x", b" hello"]) == [0, 1]
    assert TextOffsets().offsets("e\u0301 b", [b"\xc3\xa9", b" b"]) == [0, 2]  # a normalized prompt


# ---- whole responses and streams -----------------------------------------------------------------------


def _lp_delta(index: int, raw: bytes, text: str, token_id: int, **kw) -> Delta:
    t = tok(token_id, raw, -0.25)
    return Delta("r", index, text, (token_id,), (LogprobEntry(t, (t,)),), **kw)


def _deltas() -> list[Delta]:
    """日本 split over three tokens, then a skipped special token, then " ok" (ending the choice)."""
    prompt = (entry(tok(40, b"hi", math.nan)), entry(tok(41, b" \xe6", -1.0), tok(41, b" \xe6", -1.0)))
    prompt += (entry(tok(42, b"\x97\xa5", -2.0)),)
    return [
        replace(_lp_delta(0, b"\xe6\x97", "", 1), prompt_logprobs=prompt),
        _lp_delta(0, b"\xa5\xe6\x9c", "日", 2),
        _lp_delta(0, b"\xac", "本", 3),
        _lp_delta(0, b"<|quad_end|>", "", 4),
        _lp_delta(0, b" ok", " ok", 5, finish_reason="stop", usage=Usage(3, 5)),
    ]


async def _aiter(items):
    for x in items:
        yield x


def _events(gen) -> list[dict]:
    async def run():
        return [b async for b in gen]

    out = []
    for event in asyncio.run(run()):
        payload = event[len(b"data: ") :].strip()
        if payload != b"[DONE]":
            out.append(json.loads(payload))
    return out


def _check_offsets(text: str, lp: dict) -> None:
    """Every offset indexes `text`; a token whose bytes are whole characters is found there."""
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
    for token, at in zip(lp["tokens"], offsets, strict=True):
        if not token.startswith("bytes:") and not token.startswith("<|"):
            assert text[at:].startswith(token) or not text[at:], (token, at, text)


@pytest.mark.parametrize("echo", ["", "hi 日"])
def test_streamed_logprobs_are_the_whole_ones(echo: str):
    """The chunks' text and logprobs, joined, are the non-streamed choice's: offsets included."""
    prompt = echo and _deltas()[0].prompt_logprobs
    deltas = [d if echo else replace(d, prompt_logprobs=None) for d in _deltas()]
    result = ChoiceResult(0)
    for d in deltas:
        result.add(d)
    assert bool(prompt) == bool(echo)
    whole = completion_response("c", 1, "m", 3, [result], True, (echo,) if echo else ())
    body = whole.model_dump(mode="json")
    if oav.is_available() and not echo:
        oav.validate(body, "CreateCompletionResponse")
    (choice,) = body["choices"]
    assert choice["text"] == echo + "日本 ok"
    _check_offsets(choice["text"], choice["logprobs"])
    spec = StreamSpec(
        "c", 1, "m", 1, 3, include_usage=False, want_logprobs=True, prefixes=(echo,) if echo else ()
    )
    chunks = _events(completion_stream(None, spec, _aiter(deltas)))
    joined = {k: sum((c["choices"][0]["logprobs"][k] for c in chunks), []) for k in choice["logprobs"]}
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert joined == choice["logprobs"]
    offsets = choice["logprobs"]["text_offset"][-5:]
    assert offsets == [len(echo), len(echo), len(echo) + 1, len(echo) + 2, len(echo) + 2]
