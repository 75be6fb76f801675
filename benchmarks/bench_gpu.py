# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""GPU benchmark at the real InfiniteVL-4B shape with random weights (speed does not depend on values).

One run builds the model, checks the Triton kernels against the torch backend at the real shape, then
times: (1) graph-captured decode steps for batch 1..256 at contexts 1K and 8K next to the floor of
design.md section 5; (2) prefill throughput (one 8K, 32K, 128K prompt; 16 prompts of 2K; median of 3); (4) peak
GPU memory of a 1K vs a 256K-token request; (5) 448x448 video frames (256 tokens each) through the
vision tower + prefill, 1 and 16 streams. Writes `bench_gpu.json` and `bench_gpu.md` into --out.

    python benchmarks/bench_gpu.py --out benchmarks/results [--sections check,decode,prefill,memory,video]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.backends.torch_backend import TorchBackend  # noqa: E402
from model.batch import BatchMeta  # noqa: E402
from model.config import ModelConfig, parse_config  # noqa: E402
from model.infinitevl import InfiniteVLForCausalLM  # noqa: E402
from model.state import StateTensors, allocate_state  # noqa: E402

CONFIG = ROOT / "benchmarks" / "configs" / "infinitevl-4b-config.json"
DEV = torch.device("cuda")
BF16 = torch.bfloat16

# design.md section 5 (H100 80GB)
COPY_BW = 2.95e12  # B/s
LM_WEIGHT_BYTES = 6.9e9
STATE_BYTES = 113e6  # fp32 recurrent state read + written per request per step
KV_BYTES_PER_TOKEN = 9 * 1024
PREFILL_FLOPS_PER_TOKEN = 7e9
MATMUL_FLOPS = 780e12


def decode_floor_s(batch: int, ctx: int, lm_head_bytes: float = 0.0, copy_bw: float = COPY_BW) -> float:
    """design.md: (6.9 GB + B (113 MB + 9 KiB min(ctx, 8192))) / 2.95 TB/s (+ optional LM-head read).

    copy_bw replaces the H100's 2.95 TB/s with another device's measured copy bandwidth (section_device).
    """
    per_req = STATE_BYTES + KV_BYTES_PER_TOKEN * min(ctx, 8192)
    return (LM_WEIGHT_BYTES + lm_head_bytes + batch * per_req) / copy_bw


def _copy_bandwidth() -> float:
    """Bytes read + written per second by a device-to-device copy of 4 GiB."""
    src = torch.empty(4 << 30, dtype=torch.uint8, device=DEV).random_(0, 255)
    dst = torch.empty_like(src)
    return 2 * src.numel() / cuda_time(lambda: dst.copy_(src), reps=10)


def _matmul_rate() -> float:
    """FLOP per second of an 8192^3 bf16 matrix product on random data."""
    a = torch.randn(8192, 8192, dtype=BF16, device=DEV)
    b = torch.randn(8192, 8192, dtype=BF16, device=DEV)
    return 2 * 8192**3 / cuda_time(lambda: a @ b, reps=10)


@torch.inference_mode()
def section_device() -> dict[str, Any]:
    """This device's ceilings, measured as design.md measured the H100's."""
    copy_bw, matmul = _copy_bandwidth(), _matmul_rate()
    torch.cuda.empty_cache()
    res = {"copy_TBps": copy_bw / 1e12, "matmul_TFLOPs": matmul / 1e12}
    print(f"device {res}", flush=True)
    return res


# ---------------------------------------------------------------------------------------------------
# model


def load_cfg() -> ModelConfig:
    with open(CONFIG, encoding="utf-8") as f:
        return parse_config(json.load(f))


@torch.no_grad()
def build_model(cfg: ModelConfig) -> InfiniteVLForCausalLM:
    """The real-shape model on the GPU in bf16 with random weights (fan-in scaled normals)."""
    from model.backends.triton_backend import TritonBackend

    with torch.device("meta"):
        model = InfiniteVLForCausalLM(cfg, TritonBackend(DEV))
    model = model.to(dtype=BF16).to_empty(device=DEV)
    gen = torch.Generator(DEV).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.uniform_(0.0, 2.7, generator=gen)
        elif name.endswith("dt_bias") or name.endswith(".bias"):
            p.normal_(0.0, 0.1, generator=gen)
        elif p.ndim == 1:  # norm weights
            p.fill_(1.0)
        else:
            fan_in = p[0].numel()
            p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
    model.visual.reset_buffers()
    model.fuse_projections()  # as load_model does: one GEMM per projection group
    return model.eval().requires_grad_(False)


def random_state(cfg: ModelConfig, num_slots: int) -> StateTensors:
    """A pool whose rows hold random (non-zero) values, so that timing never runs on zeros."""
    state = allocate_state(cfg.text, num_slots, torch.float32, BF16, DEV)
    for t in (state.recurrent, state.conv, state.key, state.value):
        t.normal_(0.0, 0.05)
    return state


def cuda_time(fn, reps: int, warmup: int = 3) -> float:
    """Median seconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def text_positions(starts: list[int], lens: list[int]) -> torch.Tensor:
    cols = [torch.arange(s, s + n, device=DEV) for s, n in zip(starts, lens, strict=True)]
    return torch.cat(cols).expand(3, -1).contiguous()


def decode_inputs(batch: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor, BatchMeta]:
    """(random token ids, positions, BatchMeta) of one decode step of slots 0..batch-1, each at context ctx."""
    meta = BatchMeta.build(list(range(batch)), [1] * batch, [ctx] * batch, DEV)
    ids = torch.randint(0, 150000, (batch,), device=DEV)
    return ids, torch.full((3, batch), ctx, dtype=torch.int64, device=DEV), meta


def chunk_inputs(n: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor, BatchMeta]:
    """(random token ids, text positions, BatchMeta) of one n-token prefill call of slot 0 at context ctx."""
    meta = BatchMeta.build([0], [n], [ctx], DEV)
    return torch.randint(0, 150000, (n,), device=DEV), text_positions([ctx], [n]), meta


# ---------------------------------------------------------------------------------------------------
# (0) kernel checks at the real shape


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-30)).item()


@torch.inference_mode()
def section_check(cfg: ModelConfig) -> dict[str, Any]:
    from model.backends.triton_backend import TritonBackend

    tri, ref = TritonBackend(DEV), TorchBackend(DEV)
    t = cfg.text
    H, DK, DV, C, W = t.num_linear_heads, t.linear_head_dim, t.linear_value_dim, t.conv_dim, t.sliding_window
    HQ, HKV, D = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    for name, slots, lens, ctx in [
        ("decode", [0, 3, 5, 7], [1, 1, 1, 1], [0, 100, W - 1, 3 * W + 5]),
        ("prefill", [1, 4, 6], [1, 700, 1500], [0, 9000, 0]),
    ]:
        meta = BatchMeta.build(slots, lens, ctx, DEV)
        n = sum(lens)
        res: dict[str, float] = {}
        x = torch.randn(n, C, dtype=BF16, device=DEV)
        w = torch.randn(C, t.conv_size, dtype=BF16, device=DEV) * 0.5
        cs = torch.randn(9, C, t.conv_size, dtype=BF16, device=DEV)
        cs2 = cs.clone()
        res["conv_out"] = rel_err(tri.short_conv(x, w, meta, cs), ref.short_conv(x, w, meta, cs2))
        res["conv_state"] = rel_err(cs, cs2)
        q, k = (torch.randn(n, H, DK, dtype=BF16, device=DEV) for _ in range(2))
        v = torch.randn(n, H, DV, dtype=BF16, device=DEV)
        g = torch.nn.functional.logsigmoid(torch.randn(n, H, device=DEV)) * 0.3
        beta = torch.rand(n, H, dtype=BF16, device=DEV)
        s = torch.randn(9, H, DK, DV, device=DEV) * 0.05
        s2 = s.clone()
        res["gdn_out"] = rel_err(
            tri.gated_delta_rule(q, k, v, g, beta, meta, s), ref.gated_delta_rule(q, k, v, g, beta, meta, s2)
        )
        res["gdn_state"] = rel_err(s, s2)
        q = torch.randn(n, HQ, D, dtype=BF16, device=DEV)
        k, v = (torch.randn(n, HKV, D, dtype=BF16, device=DEV) for _ in range(2))
        kc, vc = (torch.randn(9, W, HKV, D, dtype=BF16, device=DEV) for _ in range(2))
        kc2, vc2 = kc.clone(), vc.clone()
        o1 = tri.sliding_window_attention(q, k, v, meta, kc, vc, D**-0.5)
        o2 = ref.sliding_window_attention(q, k, v, meta, kc2, vc2, D**-0.5)
        res["swa_out"] = rel_err(o1, o2)
        res["swa_cache_equal"] = float(torch.equal(kc, kc2) and torch.equal(vc, vc2))
        out[name] = res
        print(f"check {name}: " + ", ".join(f"{k_}={v_:.2e}" for k_, v_ in res.items()), flush=True)
    out["kernels"] = kernel_times(cfg)
    return out


@torch.inference_mode()
def kernel_times(cfg: ModelConfig) -> dict[str, Any]:
    """One layer's decode kernels alone: time and achieved bandwidth on the bytes they must move."""
    from model.backends.triton_kernels.gdn import gdn_decode
    from model.backends.triton_kernels.swa import swa_decode

    t = cfg.text
    H, DK, DV, W = t.num_linear_heads, t.linear_head_dim, t.linear_value_dim, t.sliding_window
    res = {}
    num_slots = 256
    state = torch.randn(num_slots + 1, H, DK, DV, device=DEV) * 0.05
    kc, vc = (
        torch.randn(num_slots + 1, W, t.num_key_value_heads, t.head_dim, dtype=BF16, device=DEV)
        for _ in range(2)
    )
    for batch in (1, 64, 256):
        slots = torch.arange(batch, device=DEV)
        ctx = torch.full((batch,), 8192 + 7, device=DEV)
        q, k = (torch.randn(batch, H, DK, dtype=BF16, device=DEV) for _ in range(2))
        v = torch.randn(batch, H, DV, dtype=BF16, device=DEV)
        g = -torch.rand(batch, H, device=DEV)
        beta = torch.rand(batch, H, dtype=BF16, device=DEV)
        sec = cuda_time(lambda: gdn_decode(q, k, v, g, beta, state, slots, ctx, DK**-0.5), reps=50)
        moved = batch * H * DK * DV * 4 * 2
        res[f"gdn_decode_b{batch}"] = {"us": sec * 1e6, "TBps": moved / sec / 1e12}
        qa = torch.randn(batch, t.num_attention_heads, t.head_dim, dtype=BF16, device=DEV)
        ka, va = (
            torch.randn(batch, t.num_key_value_heads, t.head_dim, dtype=BF16, device=DEV) for _ in range(2)
        )
        sec = cuda_time(lambda: swa_decode(qa, ka, va, kc, vc, slots, ctx, t.head_dim**-0.5), reps=50)
        moved = batch * W * t.num_key_value_heads * t.head_dim * 2 * 2
        res[f"swa_decode_b{batch}_ctx8k"] = {"us": sec * 1e6, "TBps": moved / sec / 1e12}
        print(
            f"kernels b={batch}: "
            + json.dumps(
                {k_: v_ for k_, v_ in res.items() if k_.endswith(f"b{batch}") or f"b{batch}_" in k_}
            ),
            flush=True,
        )
    return res


# ---------------------------------------------------------------------------------------------------
# (1) decode


@torch.inference_mode()
def section_decode(
    model: InfiniteVLForCausalLM,
    cfg: ModelConfig,
    batches: list[int],
    compile_model: bool = False,
    copy_bw: float = COPY_BW,
    copy_in_graph: bool = False,
) -> dict[str, Any]:
    from serving.cuda_graph import CudaGraphRunner

    max_batch = max(batches)
    state = random_state(cfg, max_batch)
    t0 = time.perf_counter()
    graphs = CudaGraphRunner(
        model,
        state,
        max_batch=max_batch,
        device=DEV,
        compile_model=compile_model,
        sizes=batches,
        copy_in_graph=copy_in_graph,
    )
    capture_s = time.perf_counter() - t0
    lm_head = cfg.text.vocab_size * cfg.text.hidden_size * 2
    rows = []
    for ctx in (1024, 8192):
        for batch in batches:
            # host lists, as the engine feeds a step (one pinned copy into the static inputs)
            ids = torch.randint(0, 150000, (batch,)).tolist()
            pos, slots, ctx_l = [ctx] * batch, list(range(batch)), [ctx] * batch
            sec = cuda_time(lambda: graphs.run_host(ids, pos, slots, ctx_l), reps=20)
            floor = decode_floor_s(batch, ctx)
            device_floor = decode_floor_s(batch, ctx, copy_bw=copy_bw)
            row = {
                "batch": batch,
                "ctx": ctx,
                "step_ms": sec * 1e3,
                "floor_ms": floor * 1e3,
                "ratio": sec / floor,
                "ratio_with_lm_head": sec / decode_floor_s(batch, ctx, lm_head),
                # the same floor at this device's measured copy bandwidth (equal to ratio on the H100)
                "device_floor_ms": device_floor * 1e3,
                "ratio_device": sec / device_floor,
                "tok_per_s": batch / sec,
            }
            rows.append(row)
            print(f"decode {row}", flush=True)
    # eager (no graph) at batch 1 for comparison
    meta = BatchMeta.build([0], [1], [1024], DEV)
    ids = torch.randint(0, 150000, (1,), device=DEV)
    pos = torch.full((3, 1), 1024, dtype=torch.int64, device=DEV)
    eager = cuda_time(lambda: model.compute_logits(model.forward(ids, pos, meta, state)), reps=10)
    return {"capture_s": capture_s, "compiled": compile_model, "rows": rows, "eager_b1_ctx1k_ms": eager * 1e3}


# ---------------------------------------------------------------------------------------------------
# (2) prefill and (4) memory


@torch.inference_mode()
def prefill(model, state, slots: list[int], prompt_len: int, chunk: int) -> float:
    """Chunked prefill of len(slots) equal prompts (each chunk is one packed call). Returns seconds."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = 0
    while done < prompt_len:
        n = min(chunk, prompt_len - done)
        k = len(slots)
        meta = BatchMeta.build(slots, [n] * k, [done] * k, DEV)
        ids = torch.randint(0, 150000, (n * k,), device=DEV)
        hidden = model.forward(ids, text_positions([done] * k, [n] * k), meta, state)
        model.compute_logits(hidden[meta.logits_indices])
        done += n
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def section_prefill(
    model, cfg: ModelConfig, chunk: int, matmul_flops: float = MATMUL_FLOPS
) -> dict[str, Any]:
    state = random_state(cfg, 16)
    # warm-up (compiles and autotunes): a two-chunk prompt, so chunks with a context are covered too
    prefill(model, state, [0], 2 * chunk, chunk)
    prefill(model, state, list(range(16)), 2048, 2048 * 16)
    floor_tps = MATMUL_FLOPS / PREFILL_FLOPS_PER_TOKEN
    device_floor_tps = matmul_flops / PREFILL_FLOPS_PER_TOKEN
    rows = []
    for name, slots, length in [
        ("1 x 8K", [0], 8192),
        ("1 x 32K", [0], 32768),
        ("1 x 128K", [0], 131072),
        ("16 x 2K", list(range(16)), 2048),
    ]:
        runs = [prefill(model, state, slots, length, chunk if len(slots) == 1 else length) for _ in range(3)]
        sec = statistics.median(runs)
        tps = len(slots) * length / sec
        row = {
            "case": name,
            "seconds": sec,
            "runs_s": runs,
            "tok_per_s": tps,
            "fraction_of_floor": tps / floor_tps,
            "fraction_of_device_floor": tps / device_floor_tps,
            "chunk": chunk,
        }
        rows.append(row)
        print(f"prefill {row}", flush=True)
    del state
    torch.cuda.empty_cache()
    return {
        "rows": rows,
        "floor_tok_per_s": floor_tps,
        "device_floor_tok_per_s": device_floor_tps,
    }


@torch.inference_mode()
def section_memory(model, cfg: ModelConfig, chunk: int) -> dict[str, Any]:
    state = random_state(cfg, 1)
    rows = []
    for length in (1024, 8192, 262144):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        sec = prefill(model, state, [0], length, chunk)
        meta = BatchMeta.build([0], [1], [length], DEV)
        ids = torch.zeros(1, dtype=torch.int64, device=DEV)
        for i in range(8):  # a few decode steps after the prompt
            model.forward(ids, text_positions([length + i], [1]), meta, state)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        row = {"request_tokens": length, "chunk": chunk, "peak_extra_GiB": peak / 2**30, "prefill_s": sec}
        rows.append(row)
        print(f"memory {row}", flush=True)
    slot_bytes = sum(
        x[:, 0].numel() * x.element_size() for x in (state.recurrent, state.conv, state.key, state.value)
    )
    return {
        "rows": rows,
        "slot_MiB": slot_bytes / 2**20,
        "weights_GiB": sum(p.numel() * 2 for p in model.parameters()) / 2**30,
    }


# ---------------------------------------------------------------------------------------------------
# (5) video


def frame_positions(num_streams: int, frame: int) -> torch.Tensor:
    """[3, 256 * streams]: t = frame, (h, w) over the 16 x 16 merged grid, offset past the text."""
    hh, ww = torch.meshgrid(torch.arange(16, device=DEV), torch.arange(16, device=DEV), indexing="ij")
    one = torch.stack([torch.full_like(hh, frame), hh, ww]).reshape(3, 256) + 2
    return one.repeat(1, num_streams)


@torch.inference_mode()
def section_video(model, cfg: ModelConfig, frames: int) -> dict[str, Any]:
    """448x448 video frames through the vision tower + prefill. A "frame" is one temporal patch of the
    processor (temporal_patch_size = 2 sampled frames; 1024 patch rows of 1176 values -> 256 merged
    tokens). Grids are host tensors, as `VisionTower.encode` prefers (a device grid costs one sync per call).

    per_frame: each engine step encodes one frame per stream and prefills its 256 tokens (1 and 16 streams).
    buffered: one stream encodes F frames in one call, grid [[F, 32, 32]] as the processor gives for a
    clip, then prefills their F * 256 tokens in one call at the clip's M-RoPE positions (F = 8 and 16).
    """
    from model.positions import get_rope_index

    state = random_state(cfg, 16)
    text = cfg.text
    vid = text.video_token_id

    def measure(
        mode: str, streams: int, frames_per_call: int, step, num_steps: int, vision_fn
    ) -> dict[str, Any]:
        """Steps 1..num_steps after warm-up step 0 (each step: frames_per_call frames of each stream)."""
        step(0)
        torch.cuda.synchronize()
        vision = cuda_time(vision_fn, reps=3, warmup=1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(1, num_steps + 1):
            step(i)
        torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        row = {
            "mode": mode,
            "streams": streams,
            "frames_per_call": frames_per_call,
            "frames_per_s": streams * frames_per_call * num_steps / sec,
            "ms_per_step": sec / num_steps * 1e3,
            "vision_ms_per_step": vision * 1e3,
        }
        print(f"video {row}", flush=True)
        return row

    def per_frame(streams: int) -> dict[str, Any]:
        pixels = torch.randn(streams * 1024, 1176, dtype=BF16, device=DEV)
        grid = torch.tensor([[1, 32, 32]] * streams)
        ids = torch.full((256 * streams,), vid, dtype=torch.int64, device=DEV)
        slots = list(range(streams))

        def step(frame: int) -> None:
            feats = model.encode_vision(pixels, grid)  # [256 * streams, hidden]
            meta = BatchMeta.build(slots, [256] * streams, [256 * frame] * streams, DEV)
            model.forward(ids, frame_positions(streams, frame), meta, state, inputs_embeds=feats)

        return measure("per_frame", streams, 1, step, frames, lambda: model.encode_vision(pixels, grid))

    def buffered(num_frames: int) -> dict[str, Any]:
        num_calls = max(4, math.ceil(frames / num_frames))
        n = 256 * num_frames  # tokens per call
        pixels = torch.randn(num_frames * 1024, 1176, dtype=BF16, device=DEV)
        grid = torch.tensor([[num_frames, 32, 32]])
        ids = torch.full((n,), vid, dtype=torch.int64, device=DEV)
        # the whole clip (warm-up call + timed calls) as the processor lays it out: <|vision_start|>, the
        # video pads, <|vision_end|>; frames sampled at the processor's default 2 fps
        clip_frames = (num_calls + 1) * num_frames
        prompt = [text.vision_start_token_id, *[vid] * (256 * clip_frames), text.vision_end_token_id]
        positions, _ = get_rope_index(
            prompt,
            image_grid_thw=None,
            video_grid_thw=[[clip_frames, 32, 32]],
            second_per_grid_ts=[cfg.vision.temporal_patch_size / 2.0],
            image_token_id=text.image_token_id,
            video_token_id=vid,
            vision_start_token_id=text.vision_start_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size,
            tokens_per_second=cfg.vision.tokens_per_second,
        )
        positions = positions.to(DEV)  # [3, len(prompt)]

        def step(call: int) -> None:
            start = 1 + n * call  # tokens already in the slot: <|vision_start|> and the earlier frames
            feats = model.encode_vision(pixels, grid)  # [n, hidden]
            meta = BatchMeta.build([0], [n], [start], DEV)
            model.forward(ids, positions[:, start : start + n].contiguous(), meta, state, inputs_embeds=feats)

        return measure("buffered", 1, num_frames, step, num_calls, lambda: model.encode_vision(pixels, grid))

    return {"rows": [per_frame(1), per_frame(16), buffered(8), buffered(16)]}


# ---------------------------------------------------------------------------------------------------
# report


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# GPU benchmark ({results['meta']['device']}, {results['meta']['date']}, commit {results['meta']['commit'][:10]})",
        "",
    ]
    if "device" in results:
        d = results["device"]
        lines += [
            f"Device ceilings measured here: copy {d['copy_TBps']:.2f} TB/s (read + written), "
            f"bf16 matmul {d['matmul_TFLOPs']:.0f} TFLOP/s (8192^3, random data).",
            "",
        ]
    if "decode" in results:
        lines += [
            "## Decode step (CUDA graph)",
            "",
            "floor: design.md's formula at 2.95 TB/s (the H100); device floor: at this device's measured copy",
            "bandwidth (the two agree on the H100).",
            "",
            "| batch | ctx | step ms | floor ms | ratio | ratio incl. LM head | device floor ms | device ratio | tok/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["decode"]["rows"]:
            dev_floor, dev_ratio = r.get("device_floor_ms", r["floor_ms"]), r.get("ratio_device", r["ratio"])
            lines.append(
                f"| {r['batch']} | {r['ctx']} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | {r['ratio']:.2f} | {r['ratio_with_lm_head']:.2f} | {dev_floor:.2f} | {dev_ratio:.2f} | {r['tok_per_s']:.0f} |"
            )
        lines += ["", f"eager batch 1 (no graph): {results['decode']['eager_b1_ctx1k_ms']:.2f} ms", ""]
    if "prefill" in results:
        lines += [
            "## Prefill",
            "",
            "| case | s | tok/s | of floor (780 TFLOP/s) | of device floor |",
            "|---|---|---|---|---|",
        ]
        for r in results["prefill"]["rows"]:
            dev = r.get("fraction_of_device_floor", r["fraction_of_floor"])
            lines.append(
                f"| {r['case']} | {r['seconds']:.2f} | {r['tok_per_s']:.0f} | {r['fraction_of_floor']:.2f} | {dev:.2f} |"
            )
        lines.append("")
    if "memory" in results:
        lines += [
            "## Peak memory above weights + pool",
            "",
            "| request tokens | peak extra GiB |",
            "|---|---|",
        ]
        for r in results["memory"]["rows"]:
            lines.append(f"| {r['request_tokens']} | {r['peak_extra_GiB']:.2f} |")
        lines.append("")
    if "video" in results:
        lines += [
            "## Video 448x448 (frame = one temporal patch, 256 tokens), vision + prefill",
            "",
            "per_frame: one frame per stream per step; buffered: one stream, F frames per vision + prefill call.",
            "",
            "| mode | streams | frames/call | frames/s | ms/step | vision ms/step |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["video"]["rows"]:
            mode, per_call = r.get("mode", "per_frame"), r.get("frames_per_call", 1)
            lines.append(
                f"| {mode} | {r['streams']} | {per_call} | {r['frames_per_s']:.1f} | {r['ms_per_step']:.1f} | {r['vision_ms_per_step']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--sections", default="device,check,decode,prefill,memory,video")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk (tokens per call)")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode forward before capture")
    ap.add_argument(
        "--copy-in-graph",
        action="store_true",
        help="decode graphs begin with the staging copy (CudaGraphRunner)",
    )
    ap.add_argument("--commit", default="", help="commit to record (the device copy has no git history)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    commit = (
        args.commit
        or subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    )
    results: dict[str, Any] = {
        "meta": {
            "device": torch.cuda.get_device_name(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": commit or "unknown",
            "torch": torch.__version__,
            "sections": sections,
            "copy_in_graph": args.copy_in_graph,
        }
    }
    cfg = load_cfg()
    copy_bw, matmul_flops = COPY_BW, MATMUL_FLOPS
    if "device" in sections:
        results["device"] = section_device()
        copy_bw = results["device"]["copy_TBps"] * 1e12
        matmul_flops = results["device"]["matmul_TFLOPs"] * 1e12

    def save() -> None:
        (out / "bench_gpu.json").write_text(json.dumps(results, indent=1))
        (out / "bench_gpu.md").write_text(markdown(results))

    if "check" in sections:
        results["check"] = section_check(cfg)
        save()
    model = build_model(cfg)
    if "decode" in sections:
        batches = [int(b) for b in args.batches.split(",")]
        results["decode"] = section_decode(model, cfg, batches, args.compile, copy_bw, args.copy_in_graph)
        save()
    if "prefill" in sections:
        results["prefill"] = section_prefill(model, cfg, args.chunk, matmul_flops)
        save()
    if "memory" in sections:
        results["memory"] = section_memory(model, cfg, args.chunk)
        save()
    if "video" in sections:
        results["video"] = section_video(model, cfg, args.frames)
        save()
    print(markdown(results))


if __name__ == "__main__":
    main()
