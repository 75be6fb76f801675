"""Per-call batch description handed to the model by the runner (no process-global context)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def upload(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor -> `device` without blocking the host. A plain copy to CUDA waits for every kernel
    already queued on the stream; through pinned memory the copy is queued behind them instead, so
    the host can go on enqueueing (e.g. a prefill behind a vision-tower call) while the GPU works."""
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def upload_values(values: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.tensor(values, dtype)` on `device` through `upload` (never waits for queued kernels)."""
    return upload(torch.tensor(values, dtype=dtype), device)


@dataclass(frozen=True)
class BatchMeta:
    """One forward call over B sequences whose new tokens are packed back to back (N tokens, no padding).

    Sequence b owns packed tokens cu_seqlens[b] .. cu_seqlens[b+1]-1, reads and writes pool row
    slot_ids[b], and its first new token has absolute index context_lens[b] in its sequence
    (context_lens[b] == 0 means the slot holds a fresh, zeroed state).
    Device tensors live on the model's device; the *_cpu tuples mirror them on the host so that the
    torch backend and the runner never synchronise with the GPU to read them.
    """

    slot_ids: torch.Tensor  # [B] int64, pool rows (row num_slots is the dummy slot for padding)
    cu_seqlens: torch.Tensor  # [B + 1] int32, packed token offsets
    context_lens: torch.Tensor  # [B] int64, tokens already folded into each slot's state
    logits_indices: torch.Tensor  # [B] int64, packed index of each sequence's last new token
    seq_lens_cpu: tuple[int, ...]  # new tokens per sequence in this call
    context_lens_cpu: tuple[int, ...]
    slot_ids_cpu: tuple[int, ...]
    is_decode: bool  # every sequence has exactly one new token (CUDA-graph path)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens_cpu)

    @staticmethod
    def build(
        slot_ids: list[int],
        seq_lens: list[int],
        context_lens: list[int],
        device: torch.device | str = "cpu",
    ) -> BatchMeta:
        """Build the metadata of one call from host lists."""
        if not (len(slot_ids) == len(seq_lens) == len(context_lens)):
            raise ValueError("slot_ids, seq_lens and context_lens must have the same length")
        if any(n <= 0 for n in seq_lens):
            raise ValueError("every sequence in a call needs at least one new token")
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        b = len(slot_ids)
        # one upload for all four tensors (views of it), none of which the host waits for; each view
        # starts on a 16-byte boundary (Triton specialises kernels on pointer alignment: unaligned
        # views would compile second variants in the middle of serving)
        stride = b + (b & 1)
        pad = [0] * (stride - b)
        packed = [*slot_ids, *pad, *context_lens, *pad, *(c - 1 for c in cu[1:]), *pad, *cu]
        dev = upload_values(packed, device, torch.int64)
        return BatchMeta(
            slot_ids=dev[:b],
            cu_seqlens=dev[3 * stride :].to(torch.int32),
            context_lens=dev[stride : stride + b],
            logits_indices=dev[2 * stride : 2 * stride + b],
            seq_lens_cpu=tuple(seq_lens),
            context_lens_cpu=tuple(context_lens),
            slot_ids_cpu=tuple(slot_ids),
            is_decode=all(n == 1 for n in seq_lens),
        )
