"""Host (CPU) cost of enqueueing GPU work: what bounds a prefill or vision call when the GPU is idle.

1. Launch cost per call of single kernels (Triton pointwise ops, torch ops, fla's chunked kernel,
   BatchMeta.build) on tiny inputs, so the GPU never holds the host back.
2. cProfile of one real-shape video step (1 frame of 448x448 through the vision tower, then its
   256-token prefill), with the top functions by cumulative and own host time.

    python benchmarks/profile_host.py --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_gpu import BF16, DEV, build_model, load_cfg, random_state

from model.batch import BatchMeta


def per_call_us(fn, reps: int = 200) -> float:
    """Host microseconds per call (GPU work tiny; synchronised before and after)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sec = time.perf_counter() - t0
    torch.cuda.synchronize()
    return sec / reps * 1e6


def launch_costs() -> dict[str, float]:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from model.backends.triton_kernels import pointwise

    x = torch.randn(16, 1280, dtype=BF16, device=DEV)
    w = torch.randn(1280, dtype=BF16, device=DEV)
    gu = torch.randn(16, 2 * 3424, dtype=BF16, device=DEV)
    q = torch.randn(1, 64, 4, 128, dtype=BF16, device=DEV)
    g = -torch.rand(1, 64, 4, device=DEV)
    beta = torch.rand(1, 64, 4, dtype=BF16, device=DEV)
    h0 = torch.zeros(1, 4, 128, 128, device=DEV)
    cu = torch.tensor([0, 64], device=DEV)
    cu_cpu = torch.tensor([0, 64])
    costs = {
        "torch add": per_call_us(lambda: x + x),
        "torch F.rms_norm": per_call_us(lambda: F.rms_norm(x, (1280,), w, 1e-6)),
        "torch F.linear [16,1280]x[1280,1280]": per_call_us(lambda: F.linear(x, x.new_empty(1280, 1280))),
        "triton rms_norm": per_call_us(lambda: pointwise.rms_norm(x, w, 1e-6)),
        "triton add+rms_norm": per_call_us(lambda: pointwise.rms_norm(x, w, 1e-6, x)),
        "triton silu_mul": per_call_us(lambda: pointwise.silu_mul(gu)),
        "fla chunk_gated_delta_rule (64 tokens)": per_call_us(
            lambda: chunk_gated_delta_rule(
                q,
                q,
                q,
                g,
                beta,
                initial_state=h0,
                output_final_state=True,
                use_qk_l2norm_in_kernel=True,
                cu_seqlens=cu,
                cu_seqlens_cpu=cu_cpu,
            ),  # fmt: skip
            reps=50,
        ),
        "BatchMeta.build (1 seq)": per_call_us(lambda: BatchMeta.build([0], [256], [512], DEV)),
    }
    for k, v in costs.items():
        print(f"  {v:8.1f} us  {k}", flush=True)
    return costs


def top_functions(prof: cProfile.Profile, key: str, n: int = 30) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(n)
    return buf.getvalue()


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    print("launch cost per call (host us):", flush=True)
    res: dict = {"launch_us": launch_costs()}
    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, 1)
    pixels = torch.randn(1024, 1176, dtype=BF16, device=DEV)
    grid = torch.tensor([[1, 32, 32]])
    ids = torch.full((256,), cfg.text.video_token_id, dtype=torch.int64, device=DEV)
    pos = torch.arange(512, 768, device=DEV).expand(3, 256).contiguous()

    def step() -> None:
        feats = model.encode_vision(pixels, grid)
        meta = BatchMeta.build([0], [256], [512], DEV)
        model.forward(ids, pos, meta, state, inputs_embeds=feats)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    enqueue = (time.perf_counter() - t0) / 5 * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5 * 1e3
    print(f"1-frame step: host enqueue {enqueue:.1f} ms, wall {wall:.1f} ms", flush=True)
    # a buffered 16-frame step: does the prefill's enqueue wait for the vision tower's GPU work?
    f16 = torch.randn(16 * 1024, 1176, dtype=BF16, device=DEV)
    g16 = torch.tensor([[16, 32, 32]])
    ids16 = torch.full((4096,), cfg.text.video_token_id, dtype=torch.int64, device=DEV)
    pos16 = torch.arange(512, 512 + 4096, device=DEV).expand(3, 4096).contiguous()
    split = []
    for i in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        feats = model.encode_vision(f16, g16)
        t1 = time.perf_counter()
        meta = BatchMeta.build([0], [4096], [512], DEV)
        model.forward(ids16, pos16, meta, state, inputs_embeds=feats)
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        if i:
            split.append({"vision_enqueue_ms": (t1 - t0) * 1e3, "prefill_enqueue_ms": (t2 - t1) * 1e3,
                          "wall_ms": (t3 - t0) * 1e3})  # fmt: skip
    print("16-frame step:", split[-1], flush=True)
    res["buffered16"] = split
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    torch.cuda.synchronize()
    cum, own = top_functions(prof, "cumulative"), top_functions(prof, "tottime")
    print(cum[:6000])
    print(own[:5000])
    res.update(
        {"step_enqueue_ms": enqueue, "step_wall_ms": wall, "cprofile_cumulative": cum, "cprofile_own": own}
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_host.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
