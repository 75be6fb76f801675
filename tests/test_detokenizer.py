"""Tests of serving.detokenizer against a real (tiny, locally trained) byte-level BPE tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from serving.detokenizer import IncrementalDetokenizer, logprob_entry, token_bytes, token_texts

try:
    from detokenizer_bpe import build_tokenizer, byte_token_ids
except ImportError:  # tests/ collected as a package
    from tests.detokenizer_bpe import build_tokenizer, byte_token_ids

TEXTS = [
    "hello world, the quick brown fox",
    "café naïve résumé über straße",
    "你好世界，中文文本测试",
    "emoji 😀 party 🎉 rocket 🚀 heart ❤️ done",
    "mixed: ü 🚀 你好 é 🦀 zebra ñ",  # 🦀, ñ, z are not in the training corpus
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer()


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_natural_tokens_matches_text(tok: Any, text: str) -> None:
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = _stream(detok, ids)
    assert "".join(deltas) == text
    assert detok.flush() == ""
    assert detok.text == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_by_byte_tokens_emit_whole_characters(tok: Any, text: str) -> None:
    detok = IncrementalDetokenizer(tok)
    deltas = _stream(detok, byte_token_ids(tok, text))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_split_emoji_released_on_its_last_byte(tok: Any) -> None:
    detok = IncrementalDetokenizer(tok)
    assert _stream(detok, byte_token_ids(tok, "a😀")) == ["a", "", "", "", "😀"]
    assert _stream(detok, byte_token_ids(tok, "é")) == ["", "é"]


def test_natural_tokens_split_characters(tok: Any) -> None:
    # sanity of the fixture: some natural encodings really cut a character between tokens
    ids = tok.encode("ü 🦀")
    assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_incomplete_bytes_at_end_flushed_as_replacement(tok: Any) -> None:
    partial = "😀".encode()[:3]
    detok = IncrementalDetokenizer(tok)
    assert _stream(detok, byte_token_ids(tok, "ok")) == ["o", "k"]
    assert [detok.add(i) for i in byte_token_ids(tok, "😀")[:3]] == ["", "", ""]
    flushed = detok.flush()
    assert flushed == partial.decode("utf-8", errors="replace")
    assert detok.text == "ok" + flushed
    assert detok.flush() == ""


def test_invalid_byte_followed_by_text_is_emitted(tok: Any) -> None:
    lone_continuation = byte_token_ids(tok, "é")[1:]  # 0xA9 alone is invalid UTF-8
    detok = IncrementalDetokenizer(tok)
    out = [detok.add(i) for i in lone_continuation + byte_token_ids(tok, "x")]
    assert "".join(out) == "\ufffdx"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok: Any, skip: bool) -> None:
    ids = tok.encode("hello") + [tok.convert_tokens_to_ids("<|im_end|>")] + tok.encode(" world")
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    text = "".join(_stream(detok, ids)) + detok.flush()
    assert text == ("hello world" if skip else "hello<|im_end|> world")


class _CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call received."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.lengths.append(len(ids))
        return self.inner.decode(ids, **kwargs)


def test_decodes_only_a_small_window(tok: Any) -> None:
    text = " ".join(TEXTS) * 8
    ids = tok.encode(text)
    counting = _CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting)
    assert "".join(_stream(detok, ids)) == text
    assert len(ids) > 200
    assert max(counting.lengths) <= 8
    assert len(counting.lengths) <= 2 * len(ids)


def test_token_texts(tok: Any) -> None:
    ids = tok.encode("hello world") + [tok.convert_tokens_to_ids("<|im_end|>")]
    texts = token_texts(tok, ids)
    assert "".join(texts) == "hello world<|im_end|>"
    assert texts[-1] == "<|im_end|>"


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_concatenate_to_utf8(tok: Any, text: str) -> None:
    ids = tok.encode(text)
    raw = [b for i in ids for b in token_bytes(tok, i)]
    assert bytes(raw) == text.encode("utf-8")


def test_token_bytes_single_byte_tokens_and_specials(tok: Any) -> None:
    for byte, tid in zip("é 😀\n\t".encode(), byte_token_ids(tok, "é 😀\n\t"), strict=True):
        assert token_bytes(tok, tid) == [byte]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert token_bytes(tok, im_end) == list(b"<|im_end|>")


def test_logprob_entry(tok: Any) -> None:
    hello = tok.encode("hello")[0]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    entry = logprob_entry(tok, hello, -0.5, [(hello, -0.5), (im_end, -1.25)])
    assert entry.chosen.token_id == hello
    assert entry.chosen.logprob == -0.5
    assert bytes(entry.chosen.bytes or []).decode() == entry.chosen.token
    assert [(t.token_id, t.token, t.logprob) for t in entry.top] == [
        (hello, entry.chosen.token, -0.5),
        (im_end, "<|im_end|>", -1.25),
    ]


def test_token_bytes_of_partial_character_token(tok: Any) -> None:
    lead = byte_token_ids(tok, "😀")[0]
    assert token_bytes(tok, lead) == [0xF0]
    assert token_bytes(tok, lead) == [0xF0]  # cached answer is a fresh list with the same bytes


class _WrapperOnly:
    """The transformers `decode` of a tokenizer without its `backend_tokenizer` (the generic path)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return self.inner.decode(ids, **kwargs)


@pytest.mark.parametrize("skip", [True, False])
def test_fast_decode_path_matches_the_transformers_decode(tok: Any, skip: bool) -> None:
    """A fast tokenizer is decoded through its Rust backend directly; on random id streams (special
    tokens, single bytes and split characters included) every emitted piece equals the generic path's."""
    import random

    rng = random.Random(0)
    specials = list(tok.added_tokens_decoder)  # <|endoftext|>, <|im_start|>, <|im_end|>
    pool = [*range(len(tok)), *specials * 20, *byte_token_ids(tok, "".join(TEXTS)) * 3]
    calls: list[int] = []
    wrapper_decode = tok.decode
    for _ in range(20):
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 60))]
        fast, generic = IncrementalDetokenizer(tok, skip), IncrementalDetokenizer(_WrapperOnly(tok), skip)
        tok.decode = lambda *a, **k: calls.append(1) or wrapper_decode(*a, **k)
        try:
            got = [*_stream(fast, ids), fast.flush()]
        finally:
            del tok.decode
        assert got == [*_stream(generic, ids), generic.flush()]
    assert not calls  # the fast path never went through transformers' decode
