"""Batch token sampler: per-row logits processors, greedy/random selection and logprobs.

Order per row (as in vLLM): logit_bias, min_tokens masking, repetition penalty, frequency and presence
penalties; then greedy argmax, or temperature, top_k, top_p, min_p and a random draw. Logprobs report the
model's raw distribution (log_softmax of the unprocessed logits).

Random draws use the exponential race: token = argmax(probs / E) with E ~ Exponential(1) drawn per
vocabulary entry, which samples exactly from `probs`. A seeded row draws E only from its own generator,
so its tokens do not depend on the other rows of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.batch import upload_values  # small host tensors that never wait for the queued forward
from serving.types import SamplingParams

_MASK_64 = (1 << 64) - 1
_TINY = 1e-20  # floor for exponential noise so that log(E) stays finite


@dataclass
class SamplingRow:
    """One choice of one request; the engine keeps it across steps and appends sampled tokens."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # make_generator(seed, device, choice_index) when seeded
    eos_token_ids: frozenset[int] = frozenset()
    # Penalty caches on the logits' device, built lazily and owned by the sampler:
    # _prompt_mask [V] bool (token occurs in the prompt), _output_counts [V] f32 (occurrences in the output
    # so far), _num_counted = how many output tokens _output_counts already includes.
    _prompt_mask: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _output_counts: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _num_counted: int = field(default=0, init=False, repr=False, compare=False)


@dataclass(frozen=True)
class SampleOutput:
    """Per row: the sampled token and, when requested, (chosen logprob, top-k [(id, logprob)] desc)."""

    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK_64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return x ^ (x >> 31)


def make_generator(seed: int, device: torch.device | str, choice_index: int = 0) -> torch.Generator:
    """A generator for choice `choice_index` of a request seeded with `seed`.

    Choice 0 uses the seed itself; other choices use a hash of (seed, index), so the n choices of one
    seeded request differ from each other while staying reproducible.
    """
    value = seed & _MASK_64
    if choice_index:
        value = _splitmix64(value ^ _splitmix64(choice_index))
    gen = torch.Generator(device=device)
    gen.manual_seed(value)
    return gen


class Sampler:
    """Turns a batch of next-token logits into tokens, applying each row's own parameters."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Shared by all unseeded rows; None means torch's default generator of the device.
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleOutput:
        """logits: [B, V] float32 (not modified); rows: B rows in the same order."""
        return self.launch(logits, rows).result()

    def launch(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> PendingSample:
        """Enqueue the sampling of `__call__` without waiting for the device: the tokens (and logprobs)
        are copied into host memory asynchronously; `result()` waits for that copy."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        logprobs = _raw_logprobs(logits, rows)
        chosen = self._select(_process_logits(logits, rows), rows)  # [B] int64 on the logits' device
        if logprobs is None:
            return PendingSample(*_to_host(chosen), rows, None, chosen)
        max_k = max(row.params.logprobs or 0 for row in rows)
        return PendingSample(*_to_host(_pack_logprobs(logprobs, chosen, max_k)), rows, max_k, chosen)

    def _select(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        chosen = torch.argmax(logits, dim=-1)  # [B]; ties resolve to the lowest id
        random_rows = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if random_rows:
            idx = upload_values(random_rows, logits.device)
            sub_rows = [rows[i] for i in random_rows]
            chosen = chosen.index_copy(0, idx, self._sample(logits.index_select(0, idx), sub_rows))
        return chosen

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        logits = restrict_support(apply_temperature(logits, rows), rows)
        noise = self._exponential_noise(logits, rows).clamp_min_(_TINY)
        # argmax(probs / E) == argmax(logits - log E): softmax's normaliser is the same for the whole row.
        return torch.argmax(logits - noise.log(), dim=-1)

    def _exponential_noise(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        noise = torch.empty_like(logits)
        unseeded = [i for i, row in enumerate(rows) if row.generator is None]
        if len(unseeded) == len(rows):
            return noise.exponential_(generator=self.generator)
        if unseeded:
            idx = upload_values(unseeded, logits.device)
            fill = torch.empty(len(unseeded), logits.shape[1], device=logits.device, dtype=logits.dtype)
            noise.index_copy_(0, idx, fill.exponential_(generator=self.generator))
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        return noise


# ---------------------------------------------------------------------------------------------------------
# Logprobs


def _raw_logprobs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor | None:
    """log_softmax of the rows that asked for logprobs, [B, V] (other rows computed but unused)."""
    if all(row.params.logprobs is None for row in rows):
        return None
    return torch.log_softmax(logits.float(), dim=-1)


def _pack_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, max_k: int) -> torch.Tensor:
    """[B, 2 + 2 max_k] float64 on the device: chosen id, its logprob, top-k ids, top-k logprobs
    (float64 holds int64 token ids < 2**53 and float32 logprobs exactly), so one transfer brings all."""
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1))  # [B, 1]
    top_vals, top_ids = logprobs.topk(max_k, dim=-1)  # [B, max_k], sorted desc
    return torch.cat(
        [chosen.unsqueeze(1).double(), chosen_lp.double(), top_ids.double(), top_vals.double()], 1
    )


def _to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """(host copy of t, event that marks the copy done): a non-blocking copy into pinned memory on CUDA,
    t itself elsewhere."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


class PendingSample:
    """Sampled tokens still on their way to the host (Sampler.launch)."""

    def __init__(
        self,
        host: torch.Tensor,
        done: torch.cuda.Event | None,
        rows: Sequence[SamplingRow],
        max_k: int | None,
        device_tokens: torch.Tensor,
    ) -> None:
        self._host, self._done, self._rows, self._max_k = host, done, rows, max_k
        self.device_tokens = device_tokens  # [B] int64 where they were sampled: inputs of a next step

    def result(self) -> SampleOutput:
        """Wait for the copy; the tokens and, where asked for, (chosen logprob, top-k) per row."""
        if self._done is not None:
            self._done.synchronize()
        if self._max_k is None:
            return SampleOutput(token_ids=self._host.tolist(), logprobs=[None] * len(self._rows))
        max_k = self._max_k
        token_ids: list[int] = []
        out: list[tuple[float, list[tuple[int, float]]] | None] = []
        for row, values in zip(self._rows, self._host.tolist(), strict=True):
            token_ids.append(int(values[0]))
            k = row.params.logprobs
            if k is None:
                out.append(None)
                continue
            ids, vals = values[2 : 2 + k], values[2 + max_k : 2 + max_k + k]
            out.append((values[1], [(int(t), v) for t, v in zip(ids, vals, strict=True)]))
        return SampleOutput(token_ids=token_ids, logprobs=out)


# ---------------------------------------------------------------------------------------------------------
# Logits processors (bias, min_tokens, penalties): all return a new tensor, never modify their input.


def _process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The logits after bias, min_tokens and penalties: a new tensor, or the input itself (float) when no
    row has any of them (the common case; the selection after this never writes to its input)."""
    if not any(_has_processor(row) for row in rows):
        return logits.float()
    logits = logits.float().clone()
    apply_logit_bias(logits, rows)
    apply_min_tokens(logits, rows)
    apply_penalties(logits, rows)
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place: logits[i, t] += bias for every (t, bias) of row i's logit_bias."""
    row_idx: list[int] = []
    tok_idx: list[int] = []
    values: list[float] = []
    for i, row in enumerate(rows):
        for tok, bias in (row.params.logit_bias or {}).items():
            row_idx.append(i)
            tok_idx.append(int(tok))
            values.append(float(bias))
    if row_idx:
        _index_add(logits, row_idx, tok_idx, values)


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place: while a row has fewer than min_tokens outputs, its eos and stop token ids get -inf.

    eos ids are masked even with ignore_eos (the brief's rule; vLLM leaves them open in that case)."""
    vocab_size = logits.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, row in enumerate(rows):
        if not _below_min_tokens(row):
            continue
        for tok in row.eos_token_ids | frozenset(row.params.stop_token_ids):
            if 0 <= tok < vocab_size:
                row_idx.append(i)
                tok_idx.append(tok)
    if row_idx:
        r, t = upload_values(row_idx, logits.device), upload_values(tok_idx, logits.device)
        logits.index_put_((r, t), upload_values(float("-inf"), logits.device))


def _index_add(logits: torch.Tensor, row_idx: list[int], tok_idx: list[int], values: list[float]) -> None:
    r, t = upload_values(row_idx, logits.device), upload_values(tok_idx, logits.device)
    v = upload_values(values, logits.device, logits.dtype)
    logits.index_put_((r, t), v, accumulate=True)


def _has_processor(row: SamplingRow) -> bool:
    """Whether any logits processor changes this row's logits this step."""
    p = row.params
    return bool(p.logit_bias) or _below_min_tokens(row) or _has_penalty(p)


def _below_min_tokens(row: SamplingRow) -> bool:
    """Whether the row's stop tokens are still masked (fewer outputs than min_tokens)."""
    return len(row.output_token_ids) < row.params.min_tokens


def _has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
    )


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place: repetition (prompt + output tokens), then frequency and presence (output tokens) penalties."""
    active = [i for i, row in enumerate(rows) if _has_penalty(row.params)]
    if not active:
        return
    device = logits.device
    active_rows = [rows[i] for i in active]
    idx = upload_values(active, device)
    sub = logits.index_select(0, idx)  # [A, V]
    counts = _output_counts(active_rows, logits.shape[1], device)  # [A, V] f32
    prompt_mask = torch.stack([_prompt_mask(row, logits.shape[1], device) for row in active_rows])
    values = [
        [r.params.repetition_penalty, r.params.frequency_penalty, r.params.presence_penalty]
        for r in active_rows
    ]
    rep, freq, pres = upload_values(values, device, sub.dtype).unsqueeze(2).unbind(1)  # [A, 1] each
    seen = prompt_mask | (counts > 0)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits.index_copy_(0, idx, sub)


def _prompt_mask(row: SamplingRow, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] bool of tokens in the prompt, built once per row."""
    if row._prompt_mask is None or row._prompt_mask.device != device:
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = upload_values(list(row.prompt_token_ids), device, torch.long)
        mask[ids[(ids >= 0) & (ids < vocab_size)]] = True
        row._prompt_mask = mask
    return row._prompt_mask


def _output_counts(rows: Sequence[SamplingRow], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[A, V] float32 occurrence counts of each row's output tokens.

    Each row keeps its own [V] counts on the device and the number of output tokens they include; the
    tokens appended since are added for all rows at once (one transfer, one scatter, one batched copy
    back), so the cost per step does not grow with the number of rows' kernel launches.
    """
    for row in rows:
        stale = row._output_counts is None or row._output_counts.device != device
        if stale or len(row.output_token_ids) < row._num_counted:
            row._output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            row._num_counted = 0
    counts = torch.stack([row._output_counts for row in rows])  # type: ignore[misc]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, row in enumerate(rows):
        new = row.output_token_ids[row._num_counted :]
        row_idx.extend([i] * len(new))
        tok_idx.extend(new)
        row._num_counted = len(row.output_token_ids)
    if tok_idx:
        pairs = upload_values([row_idx, tok_idx], device, torch.long)
        counts.index_put_((pairs[0], pairs[1]), torch.ones((), device=device), accumulate=True)
        torch._foreach_copy_([row._output_counts for row in rows], list(counts.unbind(0)))  # type: ignore[misc]
    return counts


# ---------------------------------------------------------------------------------------------------------
# Random-sampling warpers (temperature, top_k, top_p, min_p) on the non-greedy rows.


def apply_temperature(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """logits / temperature per row; rows here are never greedy, so temperature > 0."""
    temps = upload_values([row.params.temperature for row in rows], logits.device)
    return logits / temps.to(logits.dtype).unsqueeze(1)


def restrict_support(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Set to -inf the tokens removed by top_k, then top_p, then min_p (each row's own values)."""
    use_top_k = any(row.params.top_k > 0 for row in rows)
    use_top_p = any(row.params.top_p < 1.0 for row in rows)
    if use_top_p:
        logits = _top_k_top_p(logits, rows, use_top_k, use_top_p)
    elif use_top_k:
        logits = _top_k_only(logits, rows)
    if any(row.params.min_p > 0.0 for row in rows):
        logits = _min_p(logits, rows)
    return logits


def _top_k_top_p(
    logits: torch.Tensor, rows: Sequence[SamplingRow], use_top_k: bool, use_top_p: bool
) -> torch.Tensor:
    device, vocab_size = logits.device, logits.shape[1]
    sorted_vals, order = logits.sort(dim=-1, descending=True, stable=True)  # [R, V]
    remove = torch.zeros_like(sorted_vals, dtype=torch.bool)
    if use_top_k:
        k = [row.params.top_k if 0 < row.params.top_k < vocab_size else vocab_size for row in rows]
        kth = sorted_vals.gather(1, upload_values(k, device).unsqueeze(1) - 1)  # [R, 1]
        remove = sorted_vals < kth  # ties with the k-th value stay
        sorted_vals = sorted_vals.masked_fill(remove, float("-inf"))
    if use_top_p:
        probs = torch.softmax(sorted_vals, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better-ranked tokens
        top_p = [row.params.top_p if row.params.top_p < 1.0 else float("inf") for row in rows]
        remove = remove | (mass_before >= upload_values(top_p, device).unsqueeze(1))
        remove[:, 0] = False  # the best token stays, also where top_p rounds to 0.0 in float32
    mask = torch.zeros_like(remove).scatter(1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def _top_k_only(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """top_k without a full sort: the k-th largest value from topk(max k); ties with it stay."""
    vocab_size = logits.shape[1]
    k = [row.params.top_k if 0 < row.params.top_k < vocab_size else 0 for row in rows]  # 0: disabled
    if max(k) == 0:  # every k covers the whole vocabulary
        return logits
    top_vals = logits.topk(max(k), dim=-1).values  # [R, max_k] sorted desc
    k_t = upload_values(k, logits.device).unsqueeze(1)
    kth = top_vals.gather(1, (k_t - 1).clamp_min(0))
    kth = kth.masked_fill(k_t == 0, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _min_p(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    min_p = upload_values([row.params.min_p for row in rows], logits.device).unsqueeze(1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))
