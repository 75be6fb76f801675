"""Build the engine stack from an EngineConfig: model, processor, state pool, runner, engine core."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cache.pool import PoolLayout, StatePool, cuda_memory_budget, plan_pool
from serving.config import EngineConfig
from serving.engine import EngineCore
from serving.runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class EngineStack:
    core: EngineCore
    processor: Any  # model.processor.InfiniteVLProcessor
    layout: PoolLayout
    model_dir: Path
    backend: str


def eos_token_ids(model_dir: Path, text_cfg: Any) -> frozenset[int]:
    """`<|im_end|>` and `<|endoftext|>` (spec 7.5), or generation_config.json's list when present."""
    ids = {text_cfg.eos_token_id, text_cfg.bos_token_id}
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids = set(eos if isinstance(eos, list) else [eos])
    return frozenset(ids)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    return dev


def build_engine(config: EngineConfig, metrics: Any = None) -> EngineStack:
    from model.loader import load_model, resolve_model_dir
    from model.processor import InfiniteVLProcessor

    config.validate()
    device = resolve_device(config.device)
    model_dir = resolve_model_dir(config.model)
    model = load_model(model_dir, dtype=config.torch_dtype, device=device, backend=config.backend)
    model.eval()
    processor = InfiniteVLProcessor.from_pretrained(model_dir)
    text = model.config.text
    budget = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _warm_up(model, config, device)
        budget = cuda_memory_budget(device, config.gpu_memory_utilization)
    layout = plan_pool(
        text,
        state_dtype=config.torch_state_dtype,
        model_dtype=config.torch_dtype,
        max_num_seqs=config.max_num_seqs,
        memory_budget_bytes=budget,
    )
    pool = StatePool(text, layout, device)
    graphs = piecewise = None
    backend_name = getattr(model.backend, "name", "torch")
    if device.type == "cuda" and not config.enforce_eager and backend_name != "torch":
        from serving.cuda_graph import CudaGraphRunner

        graphs = CudaGraphRunner(model, pool.state, layout.num_slots, device)
        if config.piecewise_graphs is not False:
            from serving.piecewise_graph import PiecewiseGraphRunner, capture_sizes

            sizes = capture_sizes(config.max_num_batched_tokens, config.piecewise_max_tokens)
            piecewise = PiecewiseGraphRunner(model, pool.state, device, sizes=sizes)
    elif config.piecewise_graphs:  # asked for explicitly
        logger.warning(
            "--piecewise-graphs needs CUDA graphs (a CUDA device, the Triton backend, no --enforce-eager): "
            "every step runs eagerly"
        )
    runner = ModelRunner(model, pool, device, graphs=graphs, piecewise=piecewise)
    core = EngineCore(
        config, runner, pool, processor.tokenizer, eos_token_ids(Path(model_dir), text), metrics=metrics
    )
    if metrics is not None:
        metrics.set_cache_info(slots_total=layout.num_slots, bytes_per_slot=layout.bytes_per_slot)
    return EngineStack(core, processor, layout, Path(model_dir), backend_name)


def _warm_up(model: Any, config: EngineConfig, device: torch.device) -> None:
    """Forward passes on a throw-away three-slot state before the pool is sized: a full token budget (its
    activation workspace is counted in the peak the pool budget subtracts), then the shapes serving meets
    first — a mixed batch of a fresh prompt, a continued chunk and a decode row, and a pure decode batch —
    so that kernel JIT compilation and autotuning do not land on the first requests."""
    from model.batch import BatchMeta
    from model.state import allocate_state

    n = config.max_num_batched_tokens
    state = allocate_state(model.config.text, 3, config.torch_state_dtype, config.torch_dtype, device)
    fresh = min(n, 512)
    passes = [
        ([0], [n], [0]),
        ([0, 1, 2], [fresh, 64, 1], [0, n, n + 64]),
        ([0, 1, 2], [1, 1, 1], [n + 64, n + 64, n + 64]),
    ]
    with torch.inference_mode():
        for slots, lens, ctx in passes:
            total = sum(lens)
            ids = torch.zeros(total, dtype=torch.int64, device=device)
            pos = torch.cat([torch.arange(c, c + t) for c, t in zip(ctx, lens, strict=True)]).to(device)
            meta = BatchMeta.build(slots, lens, ctx, device=device)
            hidden = model.forward(ids, pos.expand(3, total).contiguous(), meta, state)
            model.compute_logits(hidden[meta.logits_indices])
    del state
    torch.cuda.synchronize(device)
