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


class SampledToken(NamedTuple):  # one per sampled row per step: a tuple is the cheapest record
    request_id: str
    choice: int
    token_id: int
    logprob: tuple[float, list[tuple[int, float]]] | None


class PendingStep:
    """A launched step whose sampled tokens may still be on the device (ModelRunner.launch)."""

    def __init__(self, sample: PendingSample | None, keys: list[tuple[str, int]]) -> None:
        self._sample = sample
        self._keys = keys  # (request id, choice) of each sampled row

    def result(self) -> list[SampledToken]:
        """Wait for the device; the step's tokens in row order."""
        if self._sample is None:
            return []
        out: SampleOutput = self._sample.result()
        return [
            SampledToken(rid, c, tok, lp)
            for (rid, c), tok, lp in zip(self._keys, out.token_ids, out.logprobs, strict=True)
        ]


class RequestFault(Exception):
    """Preparing one request's inputs failed; only that request is failed."""

    def __init__(self, request_id: str, cause: BaseException) -> None:
        super().__init__(f"request {request_id}: {cause}")
        self.request_id = request_id
        self.cause = cause


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: StatePool, device: torch.device, graphs=None) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.sampler = Sampler()
        self.graphs = graphs  # serving.cuda_graph.CudaGraphRunner or None
        self.image_token_id = model.config.text.image_token_id
        self.video_token_id = model.config.text.video_token_id
        self.vision_seconds = 0.0  # accumulated encoder time, read and reset by the engine for metrics
        self.vision_items = (0, 0)  # (images, video frames) encoded since the last read

    def execute(self, batch: ScheduledBatch, reqs: dict[str, EngineRequest]) -> list[SampledToken]:
        """Run one step and wait for its tokens. Raises RequestFault for a per-request input problem
        (nothing ran)."""
        return self.launch(batch, reqs).result()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, reqs: dict[str, EngineRequest]) -> PendingStep:
        """Enqueue one step (forward and sampling) without waiting for the device; `result()` of the
        returned handle waits and gives the sampled tokens. Raises RequestFault for a per-request
        input problem (nothing ran)."""
        for row in batch.rows:
            if row.is_prefill:
                self._ensure_vision(reqs[row.request_id])
        sampled = [r for r in batch.rows if r.is_sampled]
        if self.graphs is not None and batch.is_decode_only and self.graphs.can_run(len(batch.rows)):
            # every decode row is sampled; the graph returns one logits row per batch row
            logits = self.graphs.run_host(*self._decode_inputs(batch, reqs))
        else:
            input_ids, positions = self._inputs(batch, reqs)
            meta = BatchMeta.build(
                [r.slot for r in batch.rows],
                [r.num_tokens for r in batch.rows],
                [r.start for r in batch.rows],
                device=self.device,
            )
            embeds = self._embeds(batch, reqs, input_ids)
            hidden = self.model.forward(input_ids, positions, meta, self.pool.state, inputs_embeds=embeds)
            which = [i for i, r in enumerate(batch.rows) if r.is_sampled]
            last = meta.logits_indices[upload_values(which, self.device, torch.int64)]
            logits = self.model.compute_logits(hidden[last])
        for row in batch.rows:
            for dst in row.fork_to:
                self.pool.fork(row.slot, dst)
        return self._sample(logits, sampled, reqs)

    def _sample(
        self, logits: torch.Tensor, rows: list[ScheduledRow], reqs: dict[str, EngineRequest]
    ) -> PendingStep:
        # a final prefill row of an n-choice request samples every choice from the same logits
        index: list[int] = []
        srows: list[SamplingRow] = []
        keys: list[tuple[str, int]] = []
        for i, row in enumerate(rows):
            er = reqs[row.request_id]
            choices = range(er.sched.num_choices) if row.is_prefill else (row.choice,)
            for c in choices:
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
        """(token ids, text positions, slots, context lengths) of a decode-only batch as host ints."""
        ids = [reqs[r.request_id].rows[r.choice].output_token_ids[-1] for r in batch.rows]
        pos = [r.start + reqs[r.request_id].req.rope_delta for r in batch.rows]
        return ids, pos, [r.slot for r in batch.rows], [r.start for r in batch.rows]

    def _inputs(
        self, batch: ScheduledBatch, reqs: dict[str, EngineRequest]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed token ids [N] and M-RoPE positions [3, N] on the device (one copy each)."""
        if batch.is_decode_only:  # host ints, no per-row tensors
            ids, pos, _, _ = self._decode_inputs(batch, reqs)
            input_ids = torch.tensor(ids, dtype=torch.int64)
            positions = torch.tensor(pos, dtype=torch.int64).expand(3, len(pos))
        else:
            id_parts: list[torch.Tensor] = []
            pos_parts: list[torch.Tensor] = []
            for row in batch.rows:
                er = reqs[row.request_id]
                if row.is_prefill:
                    id_parts.append(er.prompt_ids[row.start : row.start + row.num_tokens])
                    pos_parts.append(er.req.positions[:, row.start : row.start + row.num_tokens])
                else:
                    id_parts.append(
                        torch.tensor([er.rows[row.choice].output_token_ids[-1]], dtype=torch.int64)
                    )
                    pos_parts.append(torch.full((3, 1), row.start + er.req.rope_delta, dtype=torch.int64))
            input_ids = torch.cat(id_parts)
            positions = torch.cat(pos_parts, dim=1)
        return upload(input_ids, self.device), upload(positions.contiguous(), self.device)

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
