"""Incremental detokenization and per-token text/bytes for logprobs.

`IncrementalDetokenizer` decodes only a short window of recent tokens per step: `prefix_offset` marks
the first token of the window and `read_offset` the first token whose text has not been emitted yet.
Text is released only when the window's decode does not end in U+FFFD, so a UTF-8 character split over
several byte-level BPE tokens is emitted once, whole; `flush()` releases what is left at the end (a
U+FFFD then stands for bytes that really are invalid or incomplete).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

from tokenizers import Tokenizer

from serving.types import LogprobEntry, TokenLogprob

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of final text pieces."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode_ids = _decoder(tokenizer, skip_special_tokens)
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # first token of the decode window
        self._read_offset = 0  # tokens before this have had their text emitted
        self._prefix_text = ""  # decode(token_ids[prefix_offset:read_offset])
        self._chunks: list[str] = []  # emitted pieces; "".join(...) == self.text

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became final with it (often "", never a split char)."""
        self.token_ids.append(token_id)
        window_text = self._decode(self._prefix_offset)
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(_REPLACEMENT):
            return ""
        return self._emit(window_text)

    def flush(self) -> str:
        """Release any held-back text (incomplete bytes decode to U+FFFD); call once at the end."""
        if self._read_offset == len(self.token_ids):
            return ""
        window_text = self._decode(self._prefix_offset)
        if len(window_text) <= len(self._prefix_text):
            self._advance()
            return ""
        return self._emit(window_text)

    def _emit(self, window_text: str) -> str:
        new_text = window_text[len(self._prefix_text) :]
        self._advance()
        self._chunks.append(new_text)
        return new_text

    def _advance(self) -> None:
        # The tokens just emitted become the next window's prefix (context for tokenizers whose decode
        # of a piece depends on what precedes it).
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._decode_ids(self.token_ids[start:end])


def _decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """decode(ids) without cleaning up tokenization spaces. A fast (Rust) tokenizer is called directly:
    transformers' `decode` wrapper costs several times the decode itself (type checks and conversions
    per call), and the engine thread decodes every generated token of every row twice per step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        # what PreTrainedTokenizerFast.decode does with clean_up_tokenization_spaces=False
        return partial(backend.decode, skip_special_tokens=skip_special_tokens)
    return partial(
        tokenizer.decode, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text of each token on its own (special tokens included), as logprobs report it; cached."""
    texts = _cache(tokenizer).texts
    out = []
    for i in ids:
        text = texts.get(i)
        if text is None:
            text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            texts[i] = text
        out.append(text)
    return out


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """The raw bytes of one token: byte-level BPE pieces map back through the GPT-2 byte alphabet;
    added/special tokens and other tokenizers fall back to the UTF-8 of their text. Cached."""
    cache = _cache(tokenizer)
    raw = cache.raw.get(token_id)
    if raw is None:
        raw = _token_bytes_uncached(tokenizer, token_id, cache.added_ids)
        cache.raw[token_id] = raw
    return list(raw)


def logprob_entry(
    tokenizer: Any, token_id: int, logprob: float, top: Sequence[tuple[int, float]]
) -> LogprobEntry:
    """A LogprobEntry (text and bytes filled in) from one row of `SampleOutput.logprobs`."""

    def one(tid: int, value: float) -> TokenLogprob:
        return TokenLogprob(tid, token_texts(tokenizer, [tid])[0], float(value), token_bytes(tokenizer, tid))

    return LogprobEntry(one(token_id, logprob), tuple(one(t, v) for t, v in top))


def _token_bytes_uncached(tokenizer: Any, token_id: int, added_ids: frozenset[int]) -> tuple[int, ...]:
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return ()
    if token_id in added_ids:
        return tuple(piece.encode("utf-8"))
    decoder = _byte_decoder()
    if all(ch in decoder for ch in piece):
        return tuple(decoder[ch] for ch in piece)
    return tuple(tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8"))


@dataclass
class _TokenCache:
    """Per-tokenizer memo of token texts and bytes (bounded by the vocabulary size)."""

    added_ids: frozenset[int]  # added/special tokens: literal text, not byte-level pieces
    texts: dict[int, str] = field(default_factory=dict)
    raw: dict[int, tuple[int, ...]] = field(default_factory=dict)


_CACHES: weakref.WeakKeyDictionary[Any, _TokenCache] = weakref.WeakKeyDictionary()


def _cache(tokenizer: Any) -> _TokenCache:
    try:
        return _CACHES[tokenizer]
    except (KeyError, TypeError):
        cache = _TokenCache(frozenset(getattr(tokenizer, "added_tokens_decoder", {}).keys()))
    with contextlib.suppress(TypeError):  # not weak-referenceable: a fresh cache each call
        _CACHES[tokenizer] = cache
    return cache


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet: printable Latin-1 bytes stand for themselves, the
    other 68 bytes (controls, space, DEL, NBSP, soft hyphen...) for chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    mapping = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in set(printable)]
    mapping.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return mapping
