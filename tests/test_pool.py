"""State pool: layout, zeroing on allocation, fork/snapshot/restore, integrity check."""

from __future__ import annotations

import pytest
import torch

from cache.pool import StatePool, plan_pool
from cache.slots import SlotAllocator
from model.config import TextConfig


def real_cfg() -> TextConfig:
    return TextConfig()  # the release's text shape (spec 2.1/2.2 defaults)


def test_real_shape_bytes_per_slot_matches_design():
    layout = plan_pool(
        real_cfg(),
        state_dtype=torch.float32,
        model_dtype=torch.bfloat16,
        max_num_seqs=None,
        memory_budget_bytes=80 * 2**30,
    )
    # 27 x 16x128x256 fp32 recurrent + 27 x 8192x4 bf16 conv + 9 x 2 x 8192x2x128 bf16 window
    expected = 27 * 16 * 128 * 256 * 4 + 27 * 8192 * 4 * 2 + 9 * 2 * 8192 * 2 * 128 * 2
    assert layout.bytes_per_slot == expected
    assert 127 <= expected / 2**20 <= 129  # design.md: about 127 MiB per slot
    assert layout.num_slots == 80 * 2**30 // expected - 1


def test_bf16_state_halves_recurrent_bytes():
    cfg = real_cfg()
    f32 = plan_pool(
        cfg, state_dtype=torch.float32, model_dtype=torch.bfloat16, max_num_seqs=4, memory_budget_bytes=None
    )
    b16 = plan_pool(
        cfg, state_dtype=torch.bfloat16, model_dtype=torch.bfloat16, max_num_seqs=4, memory_budget_bytes=None
    )
    assert f32.bytes_per_slot - b16.bytes_per_slot == 27 * 16 * 128 * 256 * 2


def test_slots_min_of_budget_and_max_num_seqs():
    cfg = real_cfg()
    per = plan_pool(
        cfg, state_dtype=torch.float32, model_dtype=torch.bfloat16, max_num_seqs=1, memory_budget_bytes=None
    ).bytes_per_slot
    lay = plan_pool(
        cfg,
        state_dtype=torch.float32,
        model_dtype=torch.bfloat16,
        max_num_seqs=100,
        memory_budget_bytes=11 * per,
    )
    assert lay.num_slots == 10
    lay = plan_pool(
        cfg,
        state_dtype=torch.float32,
        model_dtype=torch.bfloat16,
        max_num_seqs=3,
        memory_budget_bytes=11 * per,
    )
    assert lay.num_slots == 3
    with pytest.raises(ValueError, match="does not fit"):
        plan_pool(
            cfg,
            state_dtype=torch.float32,
            model_dtype=torch.bfloat16,
            max_num_seqs=3,
            memory_budget_bytes=per,
        )


def tiny_cfg() -> TextConfig:
    return TextConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_linear_heads=2,
        linear_head_dim=16,
        sliding_window=16,
        layer_types=("sliding_attention", "linear_attention", "linear_attention", "linear_attention"),
    )


def test_allocate_zeroes_fork_copies_snapshot_restores():
    cfg = tiny_cfg()
    layout = plan_pool(
        cfg, state_dtype=torch.float32, model_dtype=torch.float32, max_num_seqs=3, memory_budget_bytes=None
    )
    pool = StatePool(cfg, layout, "cpu")
    st = pool.state
    assert st.recurrent.shape[1] == 4 and pool.dummy_slot == 3
    a = pool.allocate()
    for t in (st.recurrent, st.conv, st.key, st.value):
        t[:, a].normal_()
    snap = pool.snapshot(a)
    b = pool.allocate()
    pool.fork(a, b)
    for t in (st.recurrent, st.conv, st.key, st.value):
        assert torch.equal(t[:, a], t[:, b])
    pool.free(a)
    a2 = pool.allocate()
    assert a2 == a
    for t in (st.recurrent, st.conv, st.key, st.value):
        assert not t[:, a2].any(), "a handed-out slot starts from zero"
    pool.restore(a2, snap)
    assert torch.equal(st.recurrent[:, a2], snap["recurrent"])
    pool.check()


def test_allocator_integrity():
    s = SlotAllocator(3)
    got = [s.allocate() for _ in range(3)]
    assert sorted(got) == [0, 1, 2] and s.num_free == 0
    with pytest.raises(RuntimeError):
        s.allocate()
    s.free(1)
    with pytest.raises(ValueError):
        s.free(1)
    s.check()
    s._used.add(7)  # corrupt it
    with pytest.raises(AssertionError):
        s.check()
