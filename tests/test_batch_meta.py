"""BatchMeta.build: the device tensors of one call, uploaded as views of one packed tensor."""

from __future__ import annotations

import pytest
import torch

from model.batch import BatchMeta


@pytest.mark.parametrize("num_seqs", [1, 2, 3, 5])
def test_build_values_dtypes_and_alignment(num_seqs: int) -> None:
    slots = [7, 2, 0, 4, 1][:num_seqs]
    lens = [3, 1, 5, 2, 1][:num_seqs]
    ctx = [0, 10, 4, 0, 9][:num_seqs]
    meta = BatchMeta.build(slots, lens, ctx)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    assert meta.slot_ids.tolist() == slots and meta.slot_ids.dtype == torch.int64
    assert meta.context_lens.tolist() == ctx and meta.context_lens.dtype == torch.int64
    assert meta.cu_seqlens.tolist() == cu and meta.cu_seqlens.dtype == torch.int32
    assert meta.logits_indices.tolist() == [c - 1 for c in cu[1:]]
    assert (meta.seq_lens_cpu, meta.context_lens_cpu, meta.slot_ids_cpu) == (
        tuple(lens),
        tuple(ctx),
        tuple(slots),
    )
    assert meta.is_decode == all(n == 1 for n in lens)
    # every view starts on a 16-byte boundary: kernels compiled for aligned pointers are reused
    for t in (meta.slot_ids, meta.context_lens, meta.logits_indices, meta.cu_seqlens):
        assert t.data_ptr() % 16 == 0 and t.is_contiguous()


def test_build_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        BatchMeta.build([0, 1], [1], [0])
    with pytest.raises(ValueError, match="at least one new token"):
        BatchMeta.build([0], [0], [0])
