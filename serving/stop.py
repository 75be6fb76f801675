"""Stop conditions of one choice: eos and stop token ids, stop strings, max_tokens, min_tokens.

`ChoiceDecoder` feeds each generated token through the incremental detokenizer and decides whether the
choice has finished. Streamed text never contains the beginning of a stop string that later completes:
trailing characters that could start a stop string are held back until they no longer can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.detokenizer import IncrementalDetokenizer
from serving.types import SamplingParams


@dataclass(frozen=True)
class StepResult:
    """Text made final by one token, and the finish reason once the choice has ended."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched


class ChoiceDecoder:
    """Detokenizer plus stop conditions for one choice of one request."""

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_token_ids: frozenset[int]) -> None:
        self.params = params
        self.eos_token_ids = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.stop_strings = tuple(s for s in params.stop if s)
        self.detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._pending = ""  # detokenized but held back: could be the start of a stop string
        self._chunks: list[str] = []  # released text; "".join == self.text

    @property
    def text(self) -> str:
        """All text released so far (the final text once finished)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ends_on_text(self) -> bool:
        """Whether a token can finish this choice through its text (stop strings), so that only
        `append` knows; otherwise `finishes_with` tells without detokenizing."""
        return bool(self.stop_strings)

    def finishes_with(self, token_id: int, num_tokens: int | None = None) -> bool:
        """Whether `token_id` as the choice's `num_tokens`-th generated token finishes it by token id or
        length (not by stop string). Default: the next token, that is whether `append(token_id)` will;
        the engine passes the count it knows, since this decoder may not have appended the tokens
        before it yet (their text is made later)."""
        return self._ends(token_id, self.num_tokens + 1 if num_tokens is None else num_tokens)[1]

    def _ends(self, token_id: int, num_tokens: int) -> tuple[bool, bool]:
        """(is a stop token, is the last token) for the num_tokens-th generated token."""
        checks_on = num_tokens >= self.params.min_tokens
        is_stop_token = checks_on and (token_id in self.eos_token_ids or token_id in self.stop_token_ids)
        return is_stop_token, is_stop_token or num_tokens >= self.params.max_tokens

    def append(self, token_id: int) -> StepResult:
        """Account one generated token; return the newly released text and the finish reason if any."""
        if self.is_finished:
            raise RuntimeError("append() after the choice finished")
        self.num_tokens += 1
        checks_on = self.num_tokens >= self.params.min_tokens
        is_stop_token, is_last = self._ends(token_id, self.num_tokens)
        if not is_stop_token:  # a stop token's own text is never emitted
            self._pending += self.detokenizer.add(token_id)
        if is_last:
            self._pending += self.detokenizer.flush()
        if checks_on and self.stop_strings:
            match = self._find_stop()
            if match is not None:
                return self._finish_on_string(*match)
        if is_stop_token:
            return self._finish("stop", None if token_id in self.eos_token_ids else token_id, self._pending)
        if is_last:
            return self._finish("length", None, self._pending)
        return StepResult(self._release())

    def _find_stop(self) -> tuple[str, int] | None:
        """The stop string whose first occurrence in the pending text ends first (ties: starts first)."""
        best: tuple[int, int, str] | None = None
        for stop in self.stop_strings:
            start = self._pending.find(stop)
            if start >= 0:
                key = (start + len(stop), start, stop)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[2], best[1])

    def _finish_on_string(self, stop: str, start: int) -> StepResult:
        end = start + len(stop) if self.params.include_stop_str_in_output else start
        return self._finish("stop", stop, self._pending[:end])

    def _release(self) -> str:
        """Release the pending text except its longest suffix that is a proper prefix of a stop string."""
        hold = _held_suffix_len(self._pending, self.stop_strings)
        released = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        if released:
            self._chunks.append(released)
        return released

    def _finish(self, reason: str, stop_reason: str | int | None, text: str) -> StepResult:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self._pending = ""
        if text:
            self._chunks.append(text)
        return StepResult(text, reason, stop_reason)


def _held_suffix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
