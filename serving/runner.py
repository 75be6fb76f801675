"""Model runner: a scheduled batch -> tensors -> forward -> logits -> sampled tokens."""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from cache.pool import StatePool
from model.batch import BatchMeta, upload, upload_values
from scheduler import ScheduledBatch, ScheduledRow
from serving.sampler import PendingSample, SampleOutput, Sampler, SamplingRow
from serving.sequence import EngineRequest, VisionCache

logger = logging.getLogger(__name__)
SCORE_ROWS = 256  # prompt positions scored at once: [rows, vocab] fp32 logits (155 MB at the 4B vocab)


class SampledToken(NamedTuple):  # one per sampled row per step: a tuple is the cheapest record
    request_id: str
    choice: int
    token_id: int
    logprob: tuple[float, list[tuple[int, float]]] | None


class PendingStep:
    """A launched step whose sampled tokens may still be on the device (LaunchedForward.sample)."""

    def __init__(self, sample: PendingSample | None, keys: list[tuple[str, int]]) -> None:
        self._sample = sample
        self._keys = keys  # (request id, choice) of each sampled row
        self._rows: dict[tuple[str, int], int] | None = None

    @property
    def device_tokens(self) -> torch.Tensor | None:
        """The sampled token ids [len(keys)] int64 where the sampler left them (on the device)."""
        return None if self._sample is None else self._sample.device_tokens

    def row_of(self, request_id: str, choice: int) -> int | None:
        """Index into `device_tokens` of the token this step samples for (request, choice), if any."""
        if self._rows is None:
            self._rows = {key: i for i, key in enumerate(self._keys)}
        return self._rows.get((request_id, choice))

    def result(self) -> list[SampledToken]:
        """Wait for the device; the step's tokens in row order."""
        if self._sample is None:
            return []
        out: SampleOutput = self._sample.result()
        return [
            SampledToken(rid, c, tok, lp)
            for (rid, c), tok, lp in zip(self._keys, out.token_ids, out.logprobs, strict=True)
        ]


class LaunchedForward:
    """A step whose forward and logits are enqueued (ModelRunner.launch_forward); `sample()` enqueues
    its sampling, which reads each row's output tokens on the host at that moment (penalties,
    min_tokens): with async scheduling the engine first accepts the tokens of the step before."""

    def __init__(self, runner: ModelRunner, logits: torch.Tensor, rows: list[ScheduledRow]) -> None:
        self._runner, self._logits, self._rows = runner, logits, rows

    @torch.inference_mode()
    def sample(self, reqs: dict[str, EngineRequest]) -> PendingStep:
        return self._runner._sample(self._logits, self._rows, reqs)


class TokenPatch(NamedTuple):
    """Decode inputs still on the device: packed input position dst[i] takes tokens[src[i]]."""

    dst: list[int]
    src: list[int]
    tokens: torch.Tensor  # [k] int64, the in-flight step's sampled tokens (PendingStep.device_tokens)


class RequestFault(Exception):
    """Preparing one request's inputs failed; only that request is failed."""

    def __init__(self, request_id: str, cause: BaseException) -> None:
        super().__init__(f"request {request_id}: {cause}")
        self.request_id = request_id
        self.cause = cause


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, pool: StatePool, device: torch.device, graphs=None, piecewise=None
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.sampler = Sampler()
        self.graphs = graphs  # serving.cuda_graph.CudaGraphRunner or None
        self.piecewise = piecewise  # serving.piecewise_graph.PiecewiseGraphRunner or None
        self.image_token_id = model.config.text.image_token_id
        self.video_token_id = model.config.text.video_token_id
        self.vision_seconds = 0.0  # accumulated encoder time, read and reset by the engine for metrics
        self.vision_items = (0, 0)  # (images, video frames) encoded since the last read

    def launch_is_host_bound(self, batch: ScheduledBatch) -> bool:
        """Whether enqueueing this step keeps the host busy about as long as the device takes to run
        it: every forward but a CUDA-graph replay (on a GPU an eager forward is enqueued kernel by
        kernel from Python, tens of ms for the 4B model; on the CPU the launch is the computation)."""
        return not self._replays_graph(batch)

    def step_mode(self, batch: ScheduledBatch) -> str:
        """How `launch_forward` runs this step: "cuda_graph" (a captured decode graph replayed), "piecewise"
        (the stateless parts replayed as piecewise graphs, the mixers eager) or "eager"."""
        return self._mode(batch)

    def _mode(self, batch: ScheduledBatch) -> str:
        if self._replays_graph(batch):
            return "cuda_graph"
        if self.piecewise is not None and self.piecewise.can_run(sum(r.num_tokens for r in batch.rows)):
            return "piecewise"
        return "eager"

    def _replays_graph(self, batch: ScheduledBatch) -> bool:
        return self.graphs is not None and batch.is_decode_only and self.graphs.can_run(len(batch.rows))

    @torch.inference_mode()
    def launch_forward(
        self, batch: ScheduledBatch, reqs: dict[str, EngineRequest], prev: PendingStep | None = None
    ) -> LaunchedForward:
        """Enqueue the forward of one step (and the logits of its sampled rows) without waiting for the
        device. `prev`: a step still in flight, whose tokens have not reached the host; a decode row
        that continues one of its sampled rows takes its input token from `prev.device_tokens` (a
        device-side copy), so this step can be enqueued before that one's tokens are known. Raises
        RequestFault for a per-request input problem (nothing ran)."""
        for row in batch.rows:
            if row.is_prefill:
                self._ensure_vision(reqs[row.request_id])
        sampled = [r for r in batch.rows if r.is_sampled]
        mode = self._mode(batch)
        if mode == "cuda_graph":
            # every decode row is sampled; the graph returns one logits row per batch row
            ids, pos, slots, ctx = self._decode_inputs(batch, reqs)
            logits = self.graphs.run_host(ids, pos, slots, ctx, _token_patch(_missing(batch, ids), prev))
        else:
            input_ids, positions = self._inputs(batch, reqs, prev)
            meta = BatchMeta.build(
                [r.slot for r in batch.rows],
                [r.num_tokens for r in batch.rows],
                [r.start for r in batch.rows],
                device=self.device,
            )
            embeds = self._embeds(batch, reqs, input_ids)
            if mode == "piecewise":
                hidden = self.piecewise.forward(input_ids, positions, meta, inputs_embeds=embeds)
            else:
                hidden = self.model.forward(input_ids, positions, meta, self.pool.state, inputs_embeds=embeds)
            self._score_prompts(batch, reqs, hidden)
            which = [i for i, r in enumerate(batch.rows) if r.is_sampled]
            last = meta.logits_indices[upload_values(which, self.device, torch.int64)]
            logits = self.model.compute_logits(hidden[last])
        for row in batch.rows:
            for dst in row.fork_to:
                self.pool.fork(row.slot, dst)
        return LaunchedForward(self, logits, sampled)

    def _score_prompts(
        self, batch: ScheduledBatch, reqs: dict[str, EngineRequest], hidden: torch.Tensor
    ) -> None:
        """For the prefill chunks of requests that ask for prompt logprobs: the logprob of every prompt
        token the chunk predicts (position j predicts token j + 1) and its top-k, appended to the
        request's `prompt_scores`. The logits are those sampling sees (rounded to the model dtype,
        then fp32), made SCORE_ROWS rows at a time; reading them back waits for this forward."""
        wanted = [
            i
            for i, r in enumerate(batch.rows)
            if r.is_prefill and reqs[r.request_id].req.sampling.prompt_logprobs is not None
        ]
        offsets = _offsets(batch) if wanted else []  # nothing more for the usual batch
        for i in wanted:
            row, off = batch.rows[i], offsets[i]
            er = reqs[row.request_id]
            k = er.req.sampling.prompt_logprobs
            num = min(row.num_tokens, er.prompt_ids.numel() - 1 - row.start)
            for a in range(0, num, SCORE_ROWS):
                b = min(num, a + SCORE_ROWS)
                lp = torch.log_softmax(self.model.compute_logits(hidden[off + a : off + b]), dim=-1)
                targets = er.prompt_ids[row.start + 1 + a : row.start + 1 + b]
                chosen = lp.gather(1, upload(targets, self.device).unsqueeze(1)).squeeze(1)
                top_v, top_i = lp.topk(k, dim=-1)
                for t, c, ids, vals in zip(
                    targets.tolist(), chosen.tolist(), top_i.tolist(), top_v.tolist(), strict=True
                ):
                    er.prompt_scores.append((t, c, list(zip(ids, vals, strict=True))))

    def _sample(
        self, logits: torch.Tensor, rows: list[ScheduledRow], reqs: dict[str, EngineRequest]
    ) -> PendingStep:
        # a final prefill row of an n-choice request samples every choice from the same logits
        index: list[int] = []
        srows: list[SamplingRow] = []
        keys: list[tuple[str, int]] = []
        for i, row in enumerate(rows):
            er = reqs.get(row.request_id)
            if er is None:  # finished or aborted since the forward was launched (async scheduling)
                continue
            choices = range(er.sched.num_choices) if row.is_prefill else (row.choice,)
            for c in choices:
                if er.sched.finished[c]:  # as above: its token would be dropped
                    continue
                index.append(i)
                srows.append(er.rows[c])
                keys.append((row.request_id, c))
        if not srows:
            return PendingStep(None, [])
        if len(index) != logits.shape[0] or index != list(range(len(index))):
            logits = logits[upload_values(index, logits.device, torch.int64)]
        return PendingStep(self.sampler.launch(logits.float(), srows), keys)

    def _decode_inputs(
        self, batch: ScheduledBatch, reqs: dict[str, EngineRequest]
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """(token ids, text positions, slots, context lengths) of a decode-only batch as host ints.
        A row's token is its choice's last output token, or -1 when the host has none yet for this
        position (sampled by a step still in flight: `_token_patch` supplies it)."""
        ids = [_last_token(reqs[r.request_id], r) for r in batch.rows]
        pos = [r.start + reqs[r.request_id].req.rope_delta for r in batch.rows]
        return ids, pos, [r.slot for r in batch.rows], [r.start for r in batch.rows]

    def _inputs(
        self, batch: ScheduledBatch, reqs: dict[str, EngineRequest], prev: PendingStep | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed token ids [N] and M-RoPE positions [3, N] on the device (one copy each, plus the
        device-side copy of the tokens `prev` has not handed to the host yet)."""
        if batch.is_decode_only:  # host ints, no per-row tensors
            ids, pos, _, _ = self._decode_inputs(batch, reqs)
            patch = _token_patch(_missing(batch, ids), prev)
            input_ids = torch.tensor(ids, dtype=torch.int64)
            positions = torch.tensor(pos, dtype=torch.int64).expand(3, len(pos))
        else:
            id_parts: list[torch.Tensor] = []
            pos_parts: list[torch.Tensor] = []
            missing: list[tuple[int, ScheduledRow]] = []
            for at, row in zip(_offsets(batch), batch.rows, strict=True):
                er = reqs[row.request_id]
                if row.is_prefill:
                    id_parts.append(er.prompt_ids[row.start : row.start + row.num_tokens])
                    pos_parts.append(er.req.positions[:, row.start : row.start + row.num_tokens])
                else:
                    token = _last_token(er, row)
                    if token < 0:
                        missing.append((at, row))
                    id_parts.append(torch.tensor([token], dtype=torch.int64))
                    pos_parts.append(torch.full((3, 1), row.start + er.req.rope_delta, dtype=torch.int64))
            input_ids = torch.cat(id_parts)
            positions = torch.cat(pos_parts, dim=1)
            patch = _token_patch(missing, prev)
        input_ids = upload(input_ids, self.device)
        if patch is not None:
            dst, src = upload_values([patch.dst, patch.src], self.device, torch.int64)  # one copy
            input_ids.index_copy_(0, dst, patch.tokens.index_select(0, src))
        return input_ids, upload(positions.contiguous(), self.device)

    def _ensure_vision(self, er: EngineRequest) -> None:
        """Encode every image and video of a request once, before its first prefill chunk."""
        mm = er.req.mm
        if er.vision is not None or mm is None or (mm.num_images == 0 and mm.num_videos == 0):
            return
        try:
            t0 = time.perf_counter()
            cache = VisionCache()
            dtype = next(self.model.parameters()).dtype
            # grids stay on the host: the tower derives its layout from them without a device sync
            if mm.num_images:
                cache.image_features = self.model.encode_vision(
                    mm.pixel_values.to(self.device, dtype), mm.image_grid_thw.cpu()
                )
                cache.image_prefix = _prefix_counts(er.prompt_ids, self.image_token_id)
            if mm.num_videos:
                cache.video_features = self.model.encode_vision(
                    mm.pixel_values_videos.to(self.device, dtype), mm.video_grid_thw.cpu()
                )
                cache.video_prefix = _prefix_counts(er.prompt_ids, self.video_token_id)
            for feats, prefix in (
                (cache.image_features, cache.image_prefix),
                (cache.video_features, cache.video_prefix),
            ):
                if feats is not None and feats.shape[0] != int(prefix[-1]):
                    raise ValueError(f"{feats.shape[0]} vision features for {int(prefix[-1])} pad tokens")
            er.vision = cache
            self.vision_seconds += time.perf_counter() - t0
            frames = 0 if mm.video_grid_thw is None else int(mm.video_grid_thw[:, 0].sum()) * 2
            self.vision_items = (self.vision_items[0] + mm.num_images, self.vision_items[1] + frames)
        except Exception as e:  # noqa: BLE001 - any failure here belongs to this request only
            raise RequestFault(er.request_id, e) from e

    def _embeds(
        self, batch: ScheduledBatch, reqs: dict[str, EngineRequest], input_ids: torch.Tensor
    ) -> torch.Tensor | None:
        """Token embeddings with vision features scattered into the pad tokens of this step's chunks.

        The pad rows are found in the host copy of the prompt, so the scatter never waits for the
        device (a boolean-mask index on the device would sync, stalling the host behind the vision
        tower's queued work)."""
        todo = [
            (off, row, reqs[row.request_id])
            for off, row in zip(_offsets(batch), batch.rows, strict=True)
            if row.is_prefill and reqs[row.request_id].vision is not None
        ]
        if not todo:
            return None
        embeds = self.model.embed(input_ids)
        for off, row, er in todo:
            vc = er.vision
            lo, hi = row.start, row.start + row.num_tokens
            chunk = er.prompt_ids[lo:hi]  # host
            for feats, prefix, tok in (
                (vc.image_features, vc.image_prefix, self.image_token_id),
                (vc.video_features, vc.video_prefix, self.video_token_id),
            ):
                if feats is None:
                    continue
                a, b = int(prefix[lo]), int(prefix[hi])
                if a == b:
                    continue
                rows = torch.nonzero(chunk == tok).squeeze(1) + off
                embeds.index_copy_(0, upload(rows, self.device), feats[a:b].to(embeds.dtype))
        return embeds


def _last_token(er: EngineRequest, row: ScheduledRow) -> int:
    """The input token of decode row `row`: its choice's newest output token when the host has the
    token for this position (position start - prompt_len of the outputs), else -1."""
    out = er.rows[row.choice].output_token_ids
    have = row.start - len(er.req.prompt_token_ids)  # index of this row's input among the outputs
    return out[have] if have < len(out) else -1


def _token_patch(missing: list[tuple[int, ScheduledRow]], prev: PendingStep | None) -> TokenPatch | None:
    """The device-side copies for the decode rows whose input token the host does not have yet
    ((packed offset, row) pairs): the in-flight step `prev` sampled them. None when none is missing;
    a missing token that `prev` did not sample is a bookkeeping error."""
    if not missing:
        return None
    dst: list[int] = []
    src: list[int] = []
    for at, row in missing:
        j = prev.row_of(row.request_id, row.choice) if prev is not None else None
        if j is None:
            raise RuntimeError(f"no input token for {row.request_id} choice {row.choice} at {row.start}")
        dst.append(at)
        src.append(j)
    return TokenPatch(dst, src, prev.device_tokens)


def _missing(batch: ScheduledBatch, ids: list[int]) -> list[tuple[int, ScheduledRow]]:
    """(row index, row) of the rows of a decode-only batch whose token is not on the host (-1)."""
    return [(i, r) for i, (r, t) in enumerate(zip(batch.rows, ids, strict=True)) if t < 0]


def _offsets(batch: ScheduledBatch) -> list[int]:
    out, acc = [], 0
    for r in batch.rows:
        out.append(acc)
        acc += r.num_tokens
    return out


def _prefix_counts(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """[len(ids) + 1]: number of `token_id` occurrences before each index."""
    counts = torch.zeros(ids.numel() + 1, dtype=torch.int64)
    counts[1:] = torch.cumsum((ids == token_id).to(torch.int64), 0)
    return counts
