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


@pytest.mark.parametrize(
    "host_inputs,use_pdl,copy_in_graph",
    [(False, False, False), (True, False, False), (True, True, False), (True, True, True)],
)
def test_replay_equals_eager_and_padding_is_confined(
    gpu_model, host_inputs: bool, use_pdl: bool, copy_in_graph: bool
) -> None:
    """host_inputs: the engine's path (run_host: host lists through one pinned staging copy);
    use_pdl: the Triton kernels captured with programmatic dependent launch (triton_kernels/pdl.py);
    copy_in_graph: that staging copy captured at the head of each graph."""
    from model.backends.triton_kernels import pdl

    saved_pdl, pdl.ENABLED = pdl.ENABLED, use_pdl
    try:
        _replay_case(gpu_model, host_inputs, copy_in_graph)
    finally:
        pdl.ENABLED = saved_pdl


@pytest.mark.parametrize(
    "switches",
    [
        {"rope_in_swa": True},
        {"swa_reduce_tail": True},
        {"swa_reduce_tail": True, "swa_min_split": 128, "rope_in_swa": True, "embed_in_rope_tables": True},
        {"swa_reduce_tail": True, "swa_tail_max_splits": 2, "fused_gdn_launch": {"bv": 32, "num_warps": 4}},
        {"fused_gdn_launch": {"bv": 32, "num_warps": 4}},
    ],
    ids=["rope-in-swa", "swa-tail", "swa-tail-128-rope-embed", "swa-tail-max2-gdn-bv32w4", "gdn-bv32w4"],
)
def test_replay_equals_eager_with_decode_switches(gpu_model, switches: dict) -> None:
    """The decode candidates that are off by default (TritonBackend attributes), captured in graphs
    with PDL: replay equals eager with the same switches, and padded rows stay in the dummy slot."""
    backend = gpu_model.backend
    saved = {name: getattr(backend, name) for name in switches}
    try:
        for name, value in switches.items():
            setattr(backend, name, value)
        _replay_case(gpu_model, host_inputs=True)
    finally:
        for name, value in saved.items():
            setattr(backend, name, value)


def _replay_case(gpu_model, host_inputs: bool, copy_in_graph: bool = False) -> None:
    from serving.cuda_graph import CudaGraphRunner
    from serving.runner import TokenPatch

    model = gpu_model
    num_slots = 8
    state = allocate_state(model.config.text, num_slots, torch.float32, model.dtype, DEV)
    for t in (state.recurrent, state.conv, state.key, state.value):
        t.fill_(float("nan"))  # every row poisoned: only rows the batch names may change
    graphs = CudaGraphRunner(model, state, max_batch=8, device=DEV, copy_in_graph=copy_in_graph)
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
        if host_inputs:
            out = graphs.run_host(ids.tolist(), ctx, slots, ctx)
        else:
            out = graphs.run(ids, _positions(ctx, [1, 1, 1]), live.to(DEV), torch.tensor(ctx, device=DEV))
        assert out.shape[0] == 3 and torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-2
        ids = ref.argmax(-1)
        ctx = [c + 1 for c in ctx]
    for name in ("recurrent", "conv", "key", "value"):
        t, e = getattr(state, name), getattr(eager_state, name)
        assert torch.isnan(t[:, others].float()).all(), f"{name}: a non-participating slot changed"
        assert rel_err(t[:, slots], e[:, slots]) < 1e-2, name
    with pytest.raises(ValueError, match="no captured graph"):
        graphs.run_host([1] * 9, [1] * 9, list(range(9)), [1] * 9)  # more rows than any graph
    if copy_in_graph:  # one staging buffer: no device-side inputs, no token patch
        with pytest.raises(ValueError, match="copy their own inputs"):
            graphs.run(ids, _positions(ctx, [1, 1, 1]), live.to(DEV), torch.tensor(ctx, device=DEV))
        with pytest.raises(ValueError, match="copy their own inputs"):
            graphs.run_host([-1, 1, 2], ctx, slots, ctx, TokenPatch([0], [0], ids))


@pytest.fixture(scope="module")
def fp32_oracle(tiny_ckpt_dir):
    from model.loader import load_model

    return load_model(tiny_ckpt_dir, dtype=torch.float32, device=DEV, backend="torch")


@pytest.mark.parametrize("compile_model", [False, True])
def test_greedy_tracks_torch_backend(gpu_model, fp32_oracle, compile_model: bool) -> None:
    """Teacher-forced on the fp32 oracle's greedy tokens, 200 decode steps past the window.

    Noise policy: the fast path (Triton kernels + CUDA graphs, bf16) may deviate from the fp32 oracle
    at most about as much as the torch backend run in bf16 does (its own rounding noise): per-step
    logit error <= 2x the bf16 torch error (+1e-3), and no more argmax disagreements than 2x its
    count (+2)."""
    from serving.cuda_graph import CudaGraphRunner

    model, oracle_model = gpu_model, fp32_oracle
    fast_backend = model.backend
    text = model.config.text
    slots, lens = [0, 2, 3], [5, 40, 17]
    prompts = _prompts(text.vocab_size, lens, 1)
    fast = allocate_state(text, 4, torch.float32, model.dtype, DEV)
    slow = allocate_state(text, 4, torch.float32, model.dtype, DEV)
    exact = allocate_state(text, 4, torch.float32, torch.float32, DEV)
    sizes = [4] if compile_model else None  # batch 3 replays the graph of 4; compiling costs ~20 s a size
    graphs = CudaGraphRunner(model, fast, max_batch=4, device=DEV, compile_model=compile_model, sizes=sizes)
    bf16_torch = TorchBackend(DEV)
    try:
        ref = _prefill(oracle_model, exact, slots, prompts)
        model.backend = bf16_torch
        noisy = _prefill(model, slow, slots, prompts)
        model.backend = fast_backend
        out = _prefill(model, fast, slots, prompts)
        ctx, fast_miss, noisy_miss = list(lens), 0, 0
        for _ in range(200):
            assert rel_err(out, ref) <= 2 * rel_err(noisy, ref) + 1e-3
            tokens = ref.argmax(-1)
            fast_miss += int((out.argmax(-1) != tokens).sum())
            noisy_miss += int((noisy.argmax(-1) != tokens).sum())
            ref = _eager_decode(oracle_model, exact, tokens, slots, ctx)
            model.backend = bf16_torch
            noisy = _eager_decode(model, slow, tokens, slots, ctx)
            model.backend = fast_backend
            out = graphs.run(
                tokens,
                _positions(ctx, [1] * 3),
                torch.tensor(slots, device=DEV),
                torch.tensor(ctx, device=DEV),
            )
            ctx = [c + 1 for c in ctx]
        assert fast_miss <= 2 * noisy_miss + 2, (fast_miss, noisy_miss)
    finally:
        model.backend = fast_backend


@torch.inference_mode()
def test_run_host_takes_patched_tokens_from_the_device(gpu_model) -> None:
    """Async scheduling's input path: run_host with some tokens unknown to the host (-1) and a
    TokenPatch that copies them from a device tensor gives bit-identical logits and states to run_host
    with the tokens themselves; the padding row of the graph stays on the dummy slot."""
    from serving.cuda_graph import CudaGraphRunner
    from serving.runner import TokenPatch

    model = gpu_model
    text = model.config.text
    state = allocate_state(text, 6, torch.float32, model.dtype, DEV)
    slots, lens = [4, 0, 2], [6, 11, 3]
    _prefill(model, state, slots, _prompts(text.vocab_size, lens, 2))
    other = _clone(state)
    graphs = CudaGraphRunner(model, state, max_batch=4, device=DEV)
    twin = CudaGraphRunner(model, other, max_batch=4, device=DEV)
    sampled = torch.tensor([17, 5, 29, 41], device=DEV)  # the previous step's tokens, on the device
    ctx = list(lens)
    for step in range(4):
        ids = [int(sampled[1]), 8 + step, int(sampled[3])]
        ref = twin.run_host(ids, ctx, slots, ctx).clone()
        patch = TokenPatch(dst=[0, 2], src=[1, 3], tokens=sampled)
        out = graphs.run_host([-1, 8 + step, -1], ctx, slots, ctx, patch)
        assert torch.equal(out, ref), step
        sampled = torch.cat([ref.argmax(-1), ref.argmax(-1)[:1]])
        ctx = [c + 1 for c in ctx]
    for name in ("recurrent", "conv", "key", "value"):
        assert torch.equal(getattr(state, name)[:, slots], getattr(other, name)[:, slots]), name


def test_engine_with_async_scheduling_gives_the_sequential_tokens(tiny_ckpt_dir) -> None:
    """The engine on the GPU (Triton backend, CUDA graphs), async scheduling against the sequential
    order, on a load whose batches are the same in both (all requests from the start, one length):
    the same tokens, bit for bit."""
    from serving.llm import LLM
    from serving.types import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [[(13 * i + 7 * j) % 500 + 10 for j in range(5 + 9 * i)] for i in range(5)]
    outs = {}
    for async_scheduling in (False, True):
        llm = LLM(str(tiny_ckpt_dir), device=DEV, max_num_seqs=8, async_scheduling=async_scheduling)
        assert llm.core.async_scheduling is async_scheduling and llm.core.runner.graphs is not None
        outs[async_scheduling] = [[c.token_ids for c in o.choices] for o in llm.generate(prompts, params)]
        del llm
    assert all(len(o[0]) == 24 for o in outs[True])
    assert outs[True] == outs[False]


@pytest.mark.parametrize("use_pdl", [False, True])
def test_piecewise_graphs_equal_eager_and_padding_is_confined(gpu_model, use_pdl: bool) -> None:
    """Steps with prefill rows through the piecewise CUDA graphs (serving.piecewise_graph): the
    stateless segments replayed at a padded size, the mixes eager on the step's own tokens. Hidden
    states and the pool rows of the batch equal the eager forward's within bf16 noise, over steps of
    several sizes (a larger one first, so padding rows hold stale values); every other row stays NaN."""
    from model.backends.triton_kernels import pdl
    from serving.piecewise_graph import PiecewiseGraphRunner

    model = gpu_model
    vocab = model.config.text.vocab_size
    num_slots = 8
    state = allocate_state(model.config.text, num_slots, torch.float32, model.dtype, DEV)
    for t in (state.recurrent, state.conv, state.key, state.value):
        t.fill_(float("nan"))
    saved = pdl.ENABLED
    pdl.ENABLED = use_pdl and pdl.supported()
    try:
        runner = PiecewiseGraphRunner(model, state, DEV, sizes=(16, 64, 128))
        eager_state = _clone(state)
        slots = [5, 1, 6, 2]
        ctx = [0, 0, 0, 0]
        for step, lens in enumerate(([100, 20, 1, 5], [30, 1, 1, 1], [1, 7, 1, 3], [1, 1, 1, 1])):
            ids = torch.cat(_prompts(vocab, lens, step)).to(DEV)
            pos = _positions(ctx, lens)
            with torch.inference_mode():
                meta = BatchMeta.build(slots, lens, ctx, DEV)
                ref = model.forward(ids, pos, meta, eager_state)
                out = runner.forward(ids, pos, meta)
            assert out.shape == ref.shape and torch.isfinite(out).all()
            assert rel_err(out, ref) < 1e-2, step
            ctx = [c + n for c, n in zip(ctx, lens, strict=True)]
        others = [s for s in range(num_slots) if s not in slots]
        for name in ("recurrent", "conv", "key", "value"):
            t, e = getattr(state, name), getattr(eager_state, name)
            assert torch.isnan(t[:, others].float()).all(), f"{name}: a non-participating slot changed"
            # window rows past a short sequence's tokens are never written: NaN in both
            written = ~torch.isnan(e[:, slots].float())
            assert torch.equal(written, ~torch.isnan(t[:, slots].float())), name
            assert rel_err(t[:, slots][written], e[:, slots][written]) < 1e-2, name
        assert not runner.can_run(129)
    finally:
        pdl.ENABLED = saved
