"""Engine logprobs -> OpenAI's two logprob formats: chat's `{content: [...]}` and the legacy completions one.

Legacy `tokens` name each token by its text; a token whose bytes are not valid UTF-8 on their own (a piece
of a character split over byte-level tokens) is named by its bytes, `"bytes:\\xe6\\x97"`, as OpenAI's legacy
API names them. vLLM names them by their lossy decode ("\ufffd"), which makes different tokens equal keys of
one `top_logprobs` object and hides the bytes; the bytes form keeps them apart.

Legacy `text_offset[i]` is the character index in the returned `text` where token i's text starts
(`TextOffsets`): the tokens of a character split over several tokens all get the index where that
character starts, and a token whose text is not in `text` (a special token left out with
skip_special_tokens, the part of a stop string cut off) gets the index where it would be, so offsets never
decrease and `text[text_offset[i]:text_offset[i + 1]]` is what token i added. Streamed, offsets index the
choice's whole text, so the concatenated chunks give the non-streamed offsets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from api.protocol import ChoiceLogprobs, CompletionLogprobs, TokenLogprobOut, TopLogprob
from serving.types import LogprobEntry, TokenLogprob

MIN_LOGPROB = -9999.0  # OpenAI's stand-in for "very unlikely" (JSON has no -inf)
_REPLACEMENT = "\ufffd".encode()  # what a lossy decode puts for invalid bytes
LOOKAHEAD_BYTES = 16  # how far ahead a token that does not match the text is looked for (a normalized char)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


def chat_logprobs(entries: Sequence[LogprobEntry]) -> ChoiceLogprobs:
    """Engine logprobs -> chat format `{content: [{token, logprob, bytes, top_logprobs}]}`."""
    content = [
        TokenLogprobOut(
            token=e.chosen.token,
            logprob=_finite(e.chosen.logprob),
            bytes=e.chosen.bytes,
            top_logprobs=[
                TopLogprob(token=t.token, logprob=_finite(t.logprob), bytes=t.bytes) for t in e.top
            ],
        )
        for e in entries
    ]
    return ChoiceLogprobs(content=content, refusal=None)


def token_raw(t: TokenLogprob) -> bytes:
    """The token's bytes (its text's UTF-8 where the engine gave none)."""
    return bytes(t.bytes) if t.bytes is not None else t.token.encode("utf-8", "surrogatepass")


def legacy_token(t: TokenLogprob) -> str:
    """The token's name in legacy `tokens` and `top_logprobs` keys: its text, or `bytes:\\xNN...` where its
    bytes are not valid UTF-8 on their own."""
    if t.bytes is None:
        return t.token
    raw = bytes(t.bytes)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return t.token


def legacy_logprobs(entries: Sequence[LogprobEntry], text_offset: Sequence[int]) -> CompletionLogprobs:
    """Engine logprobs and their text offsets (`TextOffsets`) -> the legacy completions format.
    `top_logprobs[i]` holds the top alternatives and the sampled token (up to logprobs + 1 of them, as
    OpenAI's schema says); an echoed prompt's first token has null logprob and top_logprobs."""
    out = CompletionLogprobs(text_offset=list(text_offset), token_logprobs=[], tokens=[], top_logprobs=[])
    for e in entries:
        out.tokens.append(legacy_token(e.chosen))
        if math.isnan(e.chosen.logprob):  # an echoed prompt's first token: nothing predicts it
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(e.chosen.logprob))
        top = {legacy_token(t): _finite(t.logprob) for t in e.top}
        top.setdefault(out.tokens[-1], out.token_logprobs[-1])
        out.top_logprobs.append(top)
    return out


class TextOffsets:
    """Where each token's text starts in a text that arrives in pieces (or whole), in characters.

    Token bytes are matched against the text's UTF-8 bytes in order. A token that starts inside a
    character gets the index of that character. Tokens whose text has not arrived yet (the first pieces
    of a split character, streamed before the token that completes it) are held as `_pending` and get the
    index where their text will start. A token that does not match is zero-width (a special token the text
    leaves out), except where the text holds U+FFFD there (bytes that are not UTF-8: the token after them
    matches past it) or the token is found a few bytes ahead (the prompt text was normalized)."""

    def __init__(self, start: int = 0) -> None:
        self._data = b""  # the text's UTF-8 from the first unmatched byte on (and what follows)
        self._pos = 0  # index into _data of the first byte no token has matched
        self._char = start  # index of the character holding byte _pos (the text's length at its end)
        self._pending: list[bytes] = []  # tokens given an offset whose text has not arrived yet

    def offsets(self, text: str, raws: Sequence[bytes]) -> list[int]:
        """Append `text` (the next piece of the text) and return the offsets of the next tokens, whose
        bytes are `raws`."""
        if text:
            self._data = self._data[self._pos :] + text.encode("utf-8", "surrogatepass")
            self._pos = 0
        return [self._next(raw) for raw in raws]

    def _next(self, raw: bytes) -> int:
        while True:
            at = self._match(raw)
            if at is not None:
                return at
            if not self._pending:
                break
            self._pending.pop(0)  # the first held token was not in the text after all (zero width)
        pos = self._pos
        while self._data.startswith(_REPLACEMENT, pos):  # invalid bytes: this token may follow them
            pos += len(_REPLACEMENT)
        if pos > self._pos and raw and self._data.startswith(raw, pos):
            return self._take(pos, len(raw))
        found = self._data.find(raw, self._pos + 1, self._pos + len(raw) + LOOKAHEAD_BYTES) if raw else -1
        if found >= 0:
            return self._take(found, len(raw))
        return self._char_at(self._pos)

    def _match(self, raw: bytes) -> int | None:
        """The offset of a token whose bytes, after the pending ones, are `raw`: matched at the first
        unmatched byte, or held as pending where the text ends inside it; None if neither."""
        held = b"".join(self._pending)
        want = held + raw
        rest = self._data[self._pos : self._pos + len(want)]
        if rest == want:
            return self._take(self._pos + len(held), len(raw))
        if want.startswith(rest) and self._pos + len(rest) == len(self._data):  # not arrived, or cut off
            self._pending.append(raw)
            return self._char_at(min(self._pos + len(held), len(self._data)))
        return None

    def _take(self, pos: int, size: int) -> int:
        """The offset of a token matched at byte `pos`; everything before its end is matched."""
        at = self._char_at(pos)
        self._advance(pos + size)
        self._pending = []
        return at

    def _char_at(self, pos: int) -> int:
        """Index of the character holding byte `pos` of _data (pos >= _pos); the length at the end."""
        data, start = self._data, self._pos
        if start >= len(data):
            return self._char
        end = min(pos, len(data) - 1)
        chars = self._char + sum(1 for b in data[start + 1 : end + 1] if b & 0xC0 != 0x80)
        return chars + 1 if pos >= len(data) else chars

    def _advance(self, pos: int) -> None:
        self._char = self._char_at(pos)
        self._pos = pos
