"""CUDA-graph capture and replay of the decode step (one new token per row).

One graph per batch size in `capture_sizes(max_batch)` records `model.forward` + `compute_logits` over
static input buffers. A batch of B rows replays the smallest captured size >= B; rows B.. point at the
dummy slot (state row num_slots) so padding reads and writes nothing else (design invariant 4).
The decode path of the kernels reads only BatchMeta's device tensors, which here are slices of the
static buffers; the host tuples of the captured BatchMeta are placeholders and are never read.

The engine feeds a step with `run_host` (host lists: one pinned-memory copy fills every static input,
padding included; two pinned staging buffers are used in turn, so the host can fill one while the
previous step's graph still reads the other); `run` takes device tensors (four device copies). With
`copy_in_graph` that pinned copy is captured at the head of each graph instead (one staging buffer,
for a loop that waits for each step's tokens before issuing the next).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import torch

from model.batch import BatchMeta
from model.state import StateTensors

if TYPE_CHECKING:
    from serving.runner import TokenPatch

logger = logging.getLogger(__name__)


def _pdl_warmup() -> contextlib.AbstractContextManager:
    """The Triton kernels' PDL warm-up context (triton_kernels/pdl.py), a no-op without Triton."""
    try:
        from model.backends.triton_kernels import pdl
    except ImportError:
        return contextlib.nullcontext()
    return pdl.warmup()


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then steps of 8 up to 64, then steps of 16, then max_batch."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, min(64, max_batch) + 1, 8))
    sizes += list(range(80, max_batch + 1, 16))
    if max_batch >= 1 and sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class CudaGraphRunner:
    """Captured decode graphs over static buffers; `run` pads a batch to the next captured size."""

    def __init__(
        self,
        model: Any,  # InfiniteVLForCausalLM: forward(ids, positions, meta, state) and compute_logits(hidden)
        state: StateTensors,
        max_batch: int,
        device: torch.device | str,
        enabled: bool = True,
        compile_model: bool = False,
        sizes: list[int] | None = None,
        copy_in_graph: bool = False,
    ) -> None:
        """Captures every size at once (default `capture_sizes(max_batch)`, or the given `sizes`).

        compile_model: torch.compile the forward before capture (fuses the elementwise code between
        kernels; experimental: each size compiles for ~20 s and bf16 results differ from eager by
        inductor's rounding, checked only by the noise-policy test in tests/test_gpu_graph.py).
        copy_in_graph: each graph starts with the host-to-device copy of the pinned staging buffer, so
        that `run_host` launches one graph and no separate copy (the copy call is 40-95 us of host time
        before the launch on the H100 machine). Only for a loop that issues a step after the previous
        one's tokens reached the host: there is one staging buffer, `run_host` takes no TokenPatch (async
        scheduling) and `run` (device tensors) is not available. Off in the engine: on the H100 it
        took 0.006-0.02 ms off a step issued onto an idle GPU and added 0.02-0.035 ms back to back
        (benchmarks/ab_copy_in_graph.py, docs/benchmarks.md).
        """
        self.model = model
        # dynamic=False: one compile per captured size. dynamic=True gave wrong states with the in-place
        # custom ops (torch 2.11; benchmarks/diag_compile.py), so it must not be used here.
        self._forward = torch.compile(model.forward, dynamic=False) if compile_model else model.forward
        self.state = state
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.dummy_slot = state.dummy_slot
        self.enabled = bool(enabled) and self.device.type == "cuda" and max_batch >= 1
        self.copy_in_graph = copy_in_graph
        if sizes is not None and (not sizes or max(sizes) > max_batch or min(sizes) < 1):
            raise ValueError(f"capture sizes {sizes} must lie in 1..max_batch={max_batch}")
        self.sizes = (sorted(set(sizes)) if sizes else capture_sizes(max_batch)) if self.enabled else []
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if not self.enabled:
            return
        n, dev = max_batch, self.device
        # static inputs [n] / [3, n], rows of one buffer that run_host fills with one copy from its
        # pinned twin; rows beyond the live batch hold the dummy slot. Rows 6 and 7: the (dst, src)
        # index pairs of a TokenPatch (input tokens still on the device), read outside the graphs
        # Two pinned twins, used in turn: a step's event is recorded after its replay (not between the
        # copy and the replay, where it delayed the launch), and the twin it guards is written again
        # two steps later, when that step is long done (the engine has taken its tokens).
        self._static = torch.zeros(8, n, dtype=torch.int64, device=dev)
        self._staging = [torch.zeros(8, n, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._staging_np = [s.numpy() for s in self._staging]  # the same memory: numpy writes lists
        self._staging_free: list[torch.cuda.Event | None] = [None, None]  # recorded after the replay
        self._staging_next = 0
        for h in self._staging_np:  # as the static buffer: dummy-slot rows (what a capture copies)
            h[4] = self.dummy_slot
        self.input_ids = self._static[0]
        self.positions = self._static[1:4]
        self.slot_ids = self._static[4]
        self.context_lens = self._static[5]
        self.slot_ids.fill_(self.dummy_slot)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=dev)
        vocab = model.config.text.vocab_size
        self.logits = torch.zeros(n, vocab, dtype=torch.float32, device=dev)  # static output
        self._capture_all()

    # --- capture ---

    def _meta(self, size: int) -> BatchMeta:
        return BatchMeta(
            slot_ids=self.slot_ids[:size],
            cu_seqlens=self.cu_seqlens[: size + 1],
            context_lens=self.context_lens[:size],
            logits_indices=self.logits_indices[:size],
            seq_lens_cpu=(1,) * size,
            context_lens_cpu=(0,) * size,  # placeholder: the decode kernels read the device tensor
            slot_ids_cpu=(self.dummy_slot,) * size,
            is_decode=True,
        )

    def _step(self, size: int) -> None:
        if self.copy_in_graph:  # the graph reads the staging buffer when it runs (a memcpy node)
            self._static.copy_(self._staging[0], non_blocking=True)
        meta = self._meta(size)
        hidden = self._forward(self.input_ids[:size], self.positions[:, :size], meta, self.state)
        self.model.compute_logits(hidden, out=self.logits[:size])

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Largest first, sharing one memory pool; warm-up and capture touch only the dummy slot."""
        self.slot_ids.fill_(self.dummy_slot)
        self.context_lens.zero_()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for size in reversed(self.sizes):  # compiles/autotunes kernels outside the capture:
                self._step(size)  # the plain variants, which eager calls of these shapes launch (logits
                with _pdl_warmup():  # of a prefill, graphs off), and the PDL ones the capture launches
                    self._step(size)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side):
                self._step(size)
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    # --- replay ---

    def padded_size(self, num_rows: int) -> int | None:
        """The captured size a batch of `num_rows` replays, or None if there is none."""
        for size in self.sizes:
            if size >= num_rows:
                return size
        return None

    def can_run(self, num_rows: int) -> bool:
        return self.enabled and num_rows >= 1 and self.padded_size(num_rows) is not None

    @torch.inference_mode()
    def run_host(
        self,
        input_ids: list[int],  # [B] token ids
        positions: list[int],  # [B] text positions (a decode token's M-RoPE triple is (p, p, p))
        slot_ids: list[int],  # [B] live slots (distinct)
        context_lens: list[int],  # [B] tokens already in each slot
        patch: TokenPatch | None = None,  # input tokens that are still on the device
    ) -> torch.Tensor:
        """`run` from host lists: the inputs and the padding rows are written into a pinned staging
        buffer and reach the static buffers in one host-to-device copy (no per-input uploads or
        device copies). Only for a batch that `can_run`. With `patch`, input_ids[dst] =
        tokens[src] on the device after that copy (the previous step's samples, async scheduling)."""
        num_rows = len(input_ids)
        size = self.padded_size(num_rows) if self.enabled else None
        if size is None:
            raise ValueError(f"no captured graph for {num_rows} rows")
        if self.copy_in_graph:
            if patch is not None:
                raise ValueError("graphs that copy their own inputs take no token patch")
            j = 0  # one buffer, read by the previous graph: done once its tokens reached the host
        else:
            j = self._staging_next
            self._staging_next = 1 - j
        free = self._staging_free[j]
        if free is not None:
            free.synchronize()  # the step that last read this buffer is done
        host = self._staging_np[j]
        host[0, :num_rows] = input_ids
        host[1:4, :num_rows] = positions  # the same position on the three M-RoPE axes
        host[4, :num_rows] = slot_ids
        host[5, :num_rows] = context_lens
        if size > num_rows:  # padded rows: dummy slot, token 0 at position 0
            host[:6, num_rows:size] = 0
            host[4, num_rows:size] = self.dummy_slot
        k = 0 if patch is None else len(patch.dst)
        if k:
            host[6, :k] = patch.dst
            host[7, :k] = patch.src
        if not self.copy_in_graph:
            self._static.copy_(self._staging[j], non_blocking=True)
        if k:
            tokens = patch.tokens.index_select(0, self._static[7, :k])
            self.input_ids.index_copy_(0, self._static[6, :k], tokens)
        self._graphs[size].replay()
        if free is None:
            free = self._staging_free[j] = torch.cuda.Event()
        free.record()
        return self.logits[:num_rows]

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,  # [B] int64
        positions: torch.Tensor,  # [3, B] int64
        slot_ids: torch.Tensor,  # [B] int64 live slots (distinct)
        context_lens: torch.Tensor,  # [B] int64 tokens already in each slot
    ) -> torch.Tensor:
        """Logits [B, vocab] fp32 of one decode step; the slots' state advances by one token.

        The returned tensor is a view of the static output buffer: valid until the next `run`.
        """
        num_rows = input_ids.shape[0]
        size = self.padded_size(num_rows) if self.enabled else None
        if size is None:
            return self._eager(input_ids, positions, slot_ids, context_lens)
        if self.copy_in_graph:
            raise ValueError("graphs that copy their own inputs from host lists take them by run_host")
        self.input_ids[:num_rows].copy_(input_ids, non_blocking=True)
        self.positions[:, :num_rows].copy_(positions, non_blocking=True)
        self.slot_ids[:num_rows].copy_(slot_ids, non_blocking=True)
        self.context_lens[:num_rows].copy_(context_lens, non_blocking=True)
        if size > num_rows:  # padded rows: dummy slot, token 0 at position 0
            self.input_ids[num_rows:size].zero_()
            self.positions[:, num_rows:size].zero_()
            self.slot_ids[num_rows:size].fill_(self.dummy_slot)
            self.context_lens[num_rows:size].zero_()
        self._graphs[size].replay()
        return self.logits[:num_rows]

    def _eager(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_ids: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> torch.Tensor:
        """Uncaptured fallback (graphs disabled or batch larger than max_batch)."""
        meta = BatchMeta.build(
            slot_ids.tolist(), [1] * input_ids.shape[0], context_lens.tolist(), device=input_ids.device
        )
        hidden = self.model.forward(input_ids, positions, meta, self.state)
        return self.model.compute_logits(hidden)
