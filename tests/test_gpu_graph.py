"""CUDA-graph decode on the tiny checkpoint: replay equals eager, padding never touches live slots,
and greedy decoding through the Triton backend + graphs tracks the torch backend (the oracle)."""

from __future__ import annotations

import pytest
import torch

from model.backends.torch_backend import TorchBackend
from model.batch import BatchMeta
from model.state import StateTensors, allocate_state
from tests.gpu_common import needs_cuda, rel_err

pytestmark = needs_cuda

DEV = "cuda"


@pytest.fixture(scope="module")
def gpu_model(tiny_ckpt_dir):
    from model.loader import load_model

    return load_model(tiny_ckpt_dir, dtype=torch.bfloat16, device=DEV, backend="triton")


def _positions(starts: list[int], lens: list[int]) -> torch.Tensor:
    cols = [torch.arange(s, s + n) for s, n in zip(starts, lens, strict=True)]
    return torch.cat(cols).expand(3, -1).contiguous().to(DEV)


def _clone(state: StateTensors) -> StateTensors:
    return StateTensors(*(t.clone() for t in (state.recurrent, state.conv, state.key, state.value)))


@torch.inference_mode()
def _prefill(model, state: StateTensors, slots: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
    """One packed prefill call; returns each sequence's last-token logits [B, V]."""
    lens = [p.numel() for p in prompts]
    meta = BatchMeta.build(slots, lens, [0] * len(slots), DEV)
    hidden = model.forward(torch.cat(prompts).to(DEV), _positions([0] * len(lens), lens), meta, state)
    return model.compute_logits(hidden[meta.logits_indices])


@torch.inference_mode()
def _eager_decode(model, state, ids, slots, ctx) -> torch.Tensor:
    meta = BatchMeta.build(slots, [1] * len(slots), ctx, DEV)
    hidden = model.forward(ids, _positions(ctx, [1] * len(ctx)), meta, state)
    return model.compute_logits(hidden)


def _prompts(vocab: int, lens: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lens]


def test_replay_equals_eager_and_padding_is_confined(gpu_model) -> None:
    from serving.cuda_graph import CudaGraphRunner

    model = gpu_model
    num_slots = 8
    state = allocate_state(model.config.text, num_slots, torch.float32, model.dtype, DEV)
    for t in (state.recurrent, state.conv, state.key, state.value):
        t.fill_(float("nan"))  # every row poisoned: only rows the batch names may change
    graphs = CudaGraphRunner(model, state, max_batch=8, device=DEV)
    assert graphs.sizes == [1, 2, 4, 8]
    slots, lens = [5, 1, 6], [7, 30, 3]  # batch of 3 replays the graph of 4: one padded row
    _prefill(model, state, slots, _prompts(model.config.text.vocab_size, lens, 0))
    live = torch.tensor(slots)
    others = [s for s in range(num_slots) if s not in slots]
    eager_state = _clone(state)
    ids = torch.tensor([3, 4, 5], device=DEV)
    ctx = list(lens)
    for _ in range(20):  # cross the window (16) of the tiny model
        ref = _eager_decode(model, eager_state, ids, slots, ctx)
        out = graphs.run(ids, _positions(ctx, [1, 1, 1]), live.to(DEV), torch.tensor(ctx, device=DEV))
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-2
        ids = ref.argmax(-1)
        ctx = [c + 1 for c in ctx]
    for name in ("recurrent", "conv", "key", "value"):
        t, e = getattr(state, name), getattr(eager_state, name)
        assert torch.isnan(t[:, others].float()).all(), f"{name}: a non-participating slot changed"
        assert rel_err(t[:, slots], e[:, slots]) < 1e-2, name


def test_greedy_tracks_torch_backend(gpu_model) -> None:
    """Teacher-forced on the oracle's greedy tokens: logits agree to bf16 noise at every step, and any
    argmax disagreement happens only at a near-tie of the oracle's logits."""
    from serving.cuda_graph import CudaGraphRunner

    model = gpu_model
    fast_backend = model.backend
    oracle_backend = TorchBackend(DEV)
    text = model.config.text
    slots, lens = [0, 2, 3], [5, 40, 17]
    prompts = _prompts(text.vocab_size, lens, 1)
    fast = allocate_state(text, 4, torch.float32, model.dtype, DEV)
    oracle = allocate_state(text, 4, torch.float32, model.dtype, DEV)
    graphs = CudaGraphRunner(model, fast, max_batch=4, device=DEV)
    try:
        model.backend = oracle_backend
        ref = _prefill(model, oracle, slots, prompts)
        model.backend = fast_backend
        out = _prefill(model, fast, slots, prompts)
        ctx, steps, mismatches = list(lens), 200, 0
        for _ in range(steps):
            assert rel_err(out, ref) < 3e-2
            tokens = ref.argmax(-1)
            diff = out.argmax(-1) != tokens
            if diff.any():
                mismatches += int(diff.sum())
                rows = diff.nonzero().flatten()
                margin = ref[rows, tokens[rows]] - ref[rows, out.argmax(-1)[rows]]
                assert (margin < 0.05 * ref[rows].std(-1)).all(), "disagreement away from a near-tie"
            model.backend = oracle_backend
            ref = _eager_decode(model, oracle, tokens, slots, ctx)
            model.backend = fast_backend
            out = graphs.run(
                tokens,
                _positions(ctx, [1] * 3),
                torch.tensor(slots, device=DEV),
                torch.tensor(ctx, device=DEV),
            )
            ctx = [c + 1 for c in ctx]
        assert mismatches <= 0.02 * steps * len(slots)
    finally:
        model.backend = fast_backend
