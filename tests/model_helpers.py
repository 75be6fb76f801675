"""Helpers of the model tests: run packed calls against a fresh state pool."""

from __future__ import annotations

import torch

from model.batch import BatchMeta
from model.state import StateTensors, allocate_state


def new_state(model, num_slots: int = 4, state_dtype: torch.dtype = torch.float32) -> StateTensors:
    """A zeroed pool for `model` (model dtype for conv/KV, `state_dtype` for the recurrence)."""
    return allocate_state(model.config.text, num_slots, state_dtype, model.dtype, "cpu")


def text_positions(start: int, length: int) -> torch.Tensor:
    """[3, length] positions start .. start+length-1 on all three axes."""
    return torch.arange(start, start + length).expand(3, -1).clone()


@torch.no_grad()
def run_chunks(
    model, ids: torch.Tensor, chunks: list[int], state: StateTensors, slot: int = 0
) -> torch.Tensor:
    """Feed `ids` to one slot in consecutive calls of the given sizes; returns the hidden states [N, hidden]."""
    assert sum(chunks) == ids.numel()
    outs, done = [], 0
    for n in chunks:
        meta = BatchMeta.build([slot], [n], [done])
        outs.append(model(ids[done : done + n], text_positions(done, n), meta, state))
        done += n
    return torch.cat(outs)


def clone_state(state: StateTensors) -> StateTensors:
    return StateTensors(*(t.clone() for t in (state.recurrent, state.conv, state.key, state.value)))


def slot_rows(state: StateTensors, slot: int) -> list[torch.Tensor]:
    """Copies of every state tensor's row `slot` (recurrent, conv, key, value)."""
    return [t[:, slot].clone() for t in (state.recurrent, state.conv, state.key, state.value)]
