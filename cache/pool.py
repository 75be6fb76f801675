"""The preallocated state pool: every request's whole past lives in one fixed-size slot.

Tensors come from `model.state.allocate_state` ([num_slots + 1, ...] per layer kind, the last row the dummy
slot used by padded rows of a captured batch). The pool is sized once at start-up from a memory budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cache.slots import SlotAllocator
from model.config import TextConfig
from model.state import StateShapes, StateTensors, allocate_state, state_shapes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolLayout:
    """Derived sizes of a pool (nothing here is written back into a config)."""

    num_slots: int
    bytes_per_slot: int
    shapes: StateShapes
    state_dtype: torch.dtype
    model_dtype: torch.dtype

    @property
    def total_bytes(self) -> int:
        """Bytes of all rows, the dummy slot included."""
        return self.bytes_per_slot * (self.num_slots + 1)

    def describe(self) -> str:
        mib = 2**20
        return (
            f"state pool: {self.num_slots} slots (+1 dummy), {self.bytes_per_slot / mib:.2f} MiB per slot "
            f"[{self.shapes.num_gdn_layers} GDN x recurrent {self.shapes.recurrent} {self.state_dtype} + conv "
            f"{self.shapes.conv}; {self.shapes.num_swa_layers} SWA x 2 x window {self.shapes.window} "
            f"{self.model_dtype}], total {self.total_bytes / mib:.1f} MiB"
        )


def plan_pool(
    cfg: TextConfig,
    *,
    state_dtype: torch.dtype,
    model_dtype: torch.dtype,
    max_num_seqs: int | None,
    memory_budget_bytes: int | None,
) -> PoolLayout:
    """Number of slots: the smaller of `max_num_seqs` and what fits in `memory_budget_bytes` (dummy included)."""
    shapes = state_shapes(cfg)
    per_slot = shapes.bytes_per_slot(state_dtype, model_dtype)
    candidates = []
    if max_num_seqs is not None:
        candidates.append(max_num_seqs)
    if memory_budget_bytes is not None:
        candidates.append(memory_budget_bytes // per_slot - 1)
    if not candidates:
        raise ValueError("give max_num_seqs or a memory budget")
    num_slots = min(candidates)
    if num_slots < 1:
        raise ValueError(
            f"the memory budget ({(memory_budget_bytes or 0) / 2**20:.1f} MiB) does not fit one slot "
            f"({per_slot / 2**20:.1f} MiB) plus the dummy slot"
        )
    return PoolLayout(num_slots, per_slot, shapes, state_dtype, model_dtype)


def cuda_memory_budget(device: torch.device, gpu_memory_utilization: float) -> int:
    """Bytes left for the pool: utilization x total device memory minus what torch already holds
    (weights and the activation workspace of the warm-up pass) — like vLLM's --gpu-memory-utilization."""
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    peak = torch.cuda.max_memory_allocated(device)
    return int(total * gpu_memory_utilization) - used_by_others - peak


class StatePool:
    """Owns the state tensors and the slot allocator; the engine thread is its only user."""

    def __init__(self, cfg: TextConfig, layout: PoolLayout, device: torch.device | str) -> None:
        self.layout = layout
        self.state: StateTensors = allocate_state(
            cfg, layout.num_slots, layout.state_dtype, layout.model_dtype, device
        )
        self.slots = SlotAllocator(layout.num_slots)
        logger.info(layout.describe())

    @property
    def num_slots(self) -> int:
        return self.layout.num_slots

    @property
    def dummy_slot(self) -> int:
        return self.layout.num_slots

    @property
    def num_free(self) -> int:
        return self.slots.num_free

    def allocate(self) -> int:
        """Hand out a slot whose state is zero (invariant 5: never a previous request's leftovers)."""
        slot = self.slots.allocate()
        self.zero(slot)
        return slot

    def free(self, slot: int) -> None:
        self.slots.free(slot)

    def zero(self, slot: int) -> None:
        for t in (self.state.recurrent, self.state.conv, self.state.key, self.state.value):
            t[:, slot].zero_()

    def fork(self, src: int, dst: int) -> None:
        """Copy the whole state of slot `src` into slot `dst` (n > 1, branching)."""
        for t in (self.state.recurrent, self.state.conv, self.state.key, self.state.value):
            t[:, dst].copy_(t[:, src])

    def snapshot(self, slot: int) -> dict[str, torch.Tensor]:
        """Host copy of one slot's state (park a conversation; restore() brings it back)."""
        return {
            name: getattr(self.state, name)[:, slot].to("cpu", copy=True)
            for name in ("recurrent", "conv", "key", "value")
        }

    def restore(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            getattr(self.state, name)[:, slot].copy_(t)

    def check(self) -> None:
        self.slots.check()
