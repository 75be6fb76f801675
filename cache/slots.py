"""Slot allocator: hands out the rows of the preallocated state pool (pure Python, no torch)."""

from __future__ import annotations


class SlotAllocator:
    """Free list over slots 0 .. num_slots-1 (row num_slots of the tensors is the dummy slot, never handed out)."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("the pool needs at least one slot")
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest slot first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self) -> int:
        """Take a free slot; raises RuntimeError when none is left (callers check num_free first)."""
        if not self._free:
            raise RuntimeError("no free slot")
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not in use")
        self._used.remove(slot)
        self._free.append(slot)

    def check(self) -> None:
        """Integrity: every slot is either free or used, exactly once."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a slot is on the free list twice")
        if free & self._used:
            raise AssertionError(f"slots both free and used: {sorted(free & self._used)}")
        if len(free) + len(self._used) != self.num_slots:
            raise AssertionError(f"free {len(free)} + used {len(self._used)} != total {self.num_slots}")
