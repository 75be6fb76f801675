"""Text decoder on the tiny model: chunking invariance, varlen batches, slot isolation, fresh slots."""

from __future__ import annotations

import pytest
import torch
from model_helpers import clone_state, new_state, run_chunks, slot_rows, text_positions

from model.batch import BatchMeta

ATOL = 2e-4  # fp32 tolerance for differently grouped but identical math


def _prompt(n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _assert_rows_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.float(), y.float(), atol=ATOL, rtol=1e-4)


def test_tiny_config_shape(tiny_model):
    cfg = tiny_model.config.text
    assert cfg.swa_layers == (0,) and cfg.gdn_layers == (1, 2, 3)
    assert cfg.sliding_window == 16 and cfg.head_dim == 16 and cfg.mrope_section == (2, 3, 3)


@pytest.mark.parametrize("length", [12, 45])
def test_chunking_invariance(tiny_model, length):
    """One call == token by token == uneven chunks, for hidden states and for the final slot state."""
    ids = _prompt(length, length, tiny_model.config.text.vocab_size)
    ref_state = new_state(tiny_model)
    ref = run_chunks(tiny_model, ids, [length], ref_state)
    chunkings = [[1] * length, _uneven(length, [1, 7, 13]), _uneven(length, [13, 2, 7, 1])]
    for chunks in chunkings:
        state = new_state(tiny_model)
        out = run_chunks(tiny_model, ids, chunks, state)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
        _assert_rows_close(slot_rows(state, 0), slot_rows(ref_state, 0))


def _uneven(total: int, pattern: list[int]) -> list[int]:
    chunks, i = [], 0
    while sum(chunks) < total:
        chunks.append(min(pattern[i % len(pattern)], total - sum(chunks)))
        i += 1
    return chunks


def test_hidden_states_depend_on_the_past(tiny_model):
    """Sanity for the invariance test: a different earlier token changes later outputs."""
    vocab = tiny_model.config.text.vocab_size
    ids = _prompt(30, 1, vocab)
    other = ids.clone()
    other[2] = (other[2] + 1) % vocab
    a = run_chunks(tiny_model, ids, [30], new_state(tiny_model))
    b = run_chunks(tiny_model, other, [30], new_state(tiny_model))
    assert not torch.allclose(a[-1], b[-1], atol=1e-3)


def _prefill(model, state, slot: int, ids: torch.Tensor) -> None:
    run_chunks(model, ids, [ids.numel()], state, slot=slot)


@torch.no_grad()
def test_varlen_batch_equals_each_alone(tiny_model):
    """Three sequences (fresh prefill, continuation across the window, decode) batched == alone."""
    vocab = tiny_model.config.text.vocab_size
    state = new_state(tiny_model, num_slots=6)
    state.recurrent[:, 5].normal_()  # an uninvolved slot with garbage: must stay untouched
    state.key[:, 5].normal_()
    histories = {0: _prompt(0, 10, vocab), 2: _prompt(20, 11, vocab), 4: _prompt(33, 12, vocab)}
    for slot, hist in histories.items():
        if hist.numel():
            _prefill(tiny_model, state, slot, hist)
    new = {0: _prompt(9, 20, vocab), 2: _prompt(5, 21, vocab), 4: _prompt(1, 22, vocab)}

    alone_state = clone_state(state)
    alone = {}
    for slot in (0, 2, 4):
        ctx = histories[slot].numel()
        meta = BatchMeta.build([slot], [new[slot].numel()], [ctx])
        alone[slot] = tiny_model(new[slot], text_positions(ctx, new[slot].numel()), meta, alone_state)

    untouched = [slot_rows(state, s) for s in (1, 3, 5, 6)]
    order = [4, 0, 2]  # batch order differs from slot order
    ids = torch.cat([new[s] for s in order])
    pos = torch.cat([text_positions(histories[s].numel(), new[s].numel()) for s in order], dim=1)
    meta = BatchMeta.build(order, [new[s].numel() for s in order], [histories[s].numel() for s in order])
    out = tiny_model(ids, pos, meta, state)

    for b, slot in enumerate(order):
        lo, hi = int(meta.cu_seqlens[b]), int(meta.cu_seqlens[b + 1])
        torch.testing.assert_close(out[lo:hi], alone[slot], atol=ATOL, rtol=1e-4)
        _assert_rows_close(slot_rows(state, slot), slot_rows(alone_state, slot))
    for s, rows in zip((1, 3, 5, 6), untouched, strict=True):
        for before, after in zip(rows, slot_rows(state, s), strict=True):
            assert torch.equal(before, after), f"slot {s} was modified"


@torch.no_grad()
def test_batched_decode_equals_each_alone(tiny_model):
    """All-decode batch (the batched fast path) == each sequence's decode step alone."""
    vocab = tiny_model.config.text.vocab_size
    state = new_state(tiny_model, num_slots=4)
    lens = {0: 3, 1: 17, 3: 40}
    for slot, n in lens.items():
        _prefill(tiny_model, state, slot, _prompt(n, 30 + slot, vocab))
    alone_state = clone_state(state)
    toks = {s: _prompt(1, 40 + s, vocab) for s in lens}
    alone = {
        s: tiny_model(toks[s], text_positions(n, 1), BatchMeta.build([s], [1], [n]), alone_state)
        for s, n in lens.items()
    }
    slots = list(lens)
    meta = BatchMeta.build(slots, [1] * 3, [lens[s] for s in slots])
    pos = torch.cat([text_positions(lens[s], 1) for s in slots], dim=1)
    out = tiny_model(torch.cat([toks[s] for s in slots]), pos, meta, state)
    assert meta.is_decode
    for b, s in enumerate(slots):
        torch.testing.assert_close(out[b : b + 1], alone[s], atol=ATOL, rtol=1e-4)
        _assert_rows_close(slot_rows(state, s), slot_rows(alone_state, s))


@pytest.mark.parametrize("length", [1, 6, 25])
@torch.no_grad()
def test_fresh_sequence_ignores_garbage_in_its_row(tiny_model, length):
    """context_lens == 0 starts from zero state whatever the pool row holds (prefill and decode paths)."""
    ids = _prompt(length, 50, tiny_model.config.text.vocab_size)
    clean = new_state(tiny_model)
    dirty = new_state(tiny_model)
    for t in (dirty.recurrent, dirty.conv, dirty.key, dirty.value):
        t.normal_(generator=torch.Generator().manual_seed(3))
    a = run_chunks(tiny_model, ids, [length], clean, slot=1)
    b = run_chunks(tiny_model, ids, [length], dirty, slot=1)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    clean_rows, dirty_rows = slot_rows(clean, 1), slot_rows(dirty, 1)
    _assert_rows_close(clean_rows[:2], dirty_rows[:2])  # recurrent and conv state
    valid = torch.arange(max(0, length - 16), length) % 16  # ring rows written by this sequence
    _assert_rows_close([r[:, valid] for r in clean_rows[2:]], [r[:, valid] for r in dirty_rows[2:]])


@torch.no_grad()
def test_inputs_embeds_replace_embedding(tiny_model):
    vocab = tiny_model.config.text.vocab_size
    ids = _prompt(8, 60, vocab)
    meta = BatchMeta.build([0], [8], [0])
    ref = tiny_model(ids, text_positions(0, 8), meta, new_state(tiny_model))
    embeds = tiny_model.embed(ids)
    other_ids = (ids + 1) % vocab  # ignored when inputs_embeds is given
    out = tiny_model(other_ids, text_positions(0, 8), meta, new_state(tiny_model), inputs_embeds=embeds)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@torch.no_grad()
def test_logits_are_tied_fp32(tiny_model):
    hidden = run_chunks(
        tiny_model, _prompt(5, 70, tiny_model.config.text.vocab_size), [5], new_state(tiny_model)
    )
    logits = tiny_model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    assert logits.shape == (5, tiny_model.config.text.vocab_size)
    torch.testing.assert_close(logits, hidden @ tiny_model.model.embed_tokens.weight.T)


@torch.no_grad()
def test_greedy_decoding_is_not_degenerate(tiny_model):
    """The tiny weights must produce varied greedy tokens (not one token forever)."""
    state = new_state(tiny_model)
    ids = _prompt(6, 80, tiny_model.config.text.vocab_size)
    hidden = run_chunks(tiny_model, ids, [6], state)
    tokens = [int(tiny_model.compute_logits(hidden[-1]).argmax())]
    for n in range(6, 36):
        h = tiny_model(torch.tensor(tokens[-1:]), text_positions(n, 1), BatchMeta.build([0], [1], [n]), state)
        tokens.append(int(tiny_model.compute_logits(h[-1]).argmax()))
    assert len(set(tokens)) >= 10
    assert len(set(tokens[-10:])) >= 3
