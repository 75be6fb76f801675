"""CPU-runnable parts of the CUDA-graph runner: the size schedule and the disabled (eager) fallback."""

from __future__ import annotations

import torch

from model.batch import BatchMeta
from model.state import allocate_state
from serving.cuda_graph import CudaGraphRunner, capture_sizes


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256
    assert [b - a for a, b in zip(sizes[4:], sizes[5:], strict=False) if b <= 64] == [8] * 6
    assert {b - a for a, b in zip(sizes, sizes[1:], strict=False) if a >= 64} == {16}
    assert capture_sizes(100)[-2:] == [96, 100]


def test_disabled_runner_runs_eager(tiny_model) -> None:
    """On CPU the runner is disabled and `run` equals a plain forward + logits."""
    text = tiny_model.config.text
    state = allocate_state(text, 3, torch.float32, tiny_model.dtype, "cpu")
    twin = allocate_state(text, 3, torch.float32, tiny_model.dtype, "cpu")
    runner = CudaGraphRunner(tiny_model, state, max_batch=4, device="cpu")
    assert not runner.enabled and not runner.can_run(1)
    ids = torch.tensor([5, 9])
    pos = torch.tensor([[0, 0], [0, 0], [0, 0]])
    slots, ctx = torch.tensor([2, 0]), torch.tensor([0, 0])
    with torch.inference_mode():
        out = runner.run(ids, pos, slots, ctx)
        meta = BatchMeta.build([2, 0], [1, 1], [0, 0])
        ref = tiny_model.compute_logits(tiny_model.forward(ids, pos, meta, twin))
    assert torch.equal(out, ref)
    assert torch.equal(state.recurrent, twin.recurrent)
