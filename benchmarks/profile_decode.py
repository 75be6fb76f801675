"""Where a real-shape decode step spends GPU time: kernel table from torch.profiler (eager step, so
every kernel shows), and the graph-captured step time with and without torch.compile of the model.

    python benchmarks/profile_decode.py --batches 1,64 --out DIR
"""

# ruff: noqa: B023
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_gpu import (
    build_model,
    chunk_inputs,
    cuda_time,
    decode_floor_s,
    decode_inputs,
    load_cfg,
    random_state,
)

from model.backends.triton_kernels import pdl


def kernel_table(step, top: int = 25) -> tuple[list[dict], int, float]:
    """(top kernels by total GPU time, kernels per step, GPU busy ms per step) of one eager step."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows, count, total = [], 0, 0.0
    for ev in prof.key_averages():
        if ev.device_type.name != "CUDA" and getattr(ev, "self_device_time_total", 0) == 0:
            continue
        t = ev.self_device_time_total
        if t <= 0:
            continue
        rows.append({"name": ev.key[:90], "calls": ev.count, "us": t})
        count += ev.count
        total += t
    rows.sort(key=lambda r: -r["us"])
    return rows[:top], count, total / 1e3


def graph_ms_with(model, step, **backend_attrs) -> float:
    """Graph step time (ms) with backend attributes set for the capture (e.g. `pointwise=None`: the
    model's own torch code instead of the fused ops)."""
    saved = {name: getattr(model.backend, name) for name in backend_attrs}
    for name, value in backend_attrs.items():
        setattr(model.backend, name, value)
    try:
        with pdl.warmup():  # the kernel variants the capture launches
            step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return cuda_time(graph.replay, reps=20) * 1e3
    finally:
        for name, value in saved.items():
            setattr(model.backend, name, value)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per decode step")
    ap.add_argument("--out", default=".")
    ap.add_argument(
        "--prefill", type=int, default=0, help="also profile one prefill chunk of this many tokens"
    )
    args = ap.parse_args()
    cfg = load_cfg()
    model = build_model(cfg)
    batches = [int(b) for b in args.batches.split(",")]
    state = random_state(cfg, max(batches))
    res: dict = {}
    if args.prefill:
        n = args.prefill
        ids, pos, meta = chunk_inputs(n, 8192)
        top, count, busy = kernel_table(lambda: model.forward(ids, pos, meta, state), top=30)
        wall = cuda_time(lambda: model.forward(ids, pos, meta, state), reps=5)
        ops, model.backend.pointwise = model.backend.pointwise, None
        wall_plain = cuda_time(lambda: model.forward(ids, pos, meta, state), reps=5)
        model.backend.pointwise = ops
        print(f"prefill wall without the fused pointwise ops: {wall_plain * 1e3:.1f} ms")
        print(
            f"prefill {n} tokens at ctx 8192: {count} kernels, GPU busy {busy:.1f} ms, wall {wall * 1e3:.1f} ms"
        )
        for row in top:
            print(f"  {row['us']:9.1f} us {row['calls']:5d}x  {row['name']}")
        res["prefill"] = {
            "tokens": n,
            "kernels": count,
            "gpu_busy_ms": busy,
            "wall_ms": wall * 1e3,
            "wall_ms_plain_pointwise": wall_plain * 1e3,
            "top": top,
        }
    for batch in batches:
        ids, pos, meta = decode_inputs(batch, args.ctx)

        def step(fwd=model.forward):
            return model.compute_logits(fwd(ids, pos, meta, state))

        top, count, busy = kernel_table(step, top=args.top)
        r = {
            "kernels_per_step": count,
            "gpu_busy_ms": busy,
            "floor_ms": decode_floor_s(batch, args.ctx) * 1e3,
            "top": top,
        }
        print(f"batch {batch}: {count} kernels, GPU busy {busy:.2f} ms, floor {r['floor_ms']:.2f} ms")
        for row in top:
            print(f"  {row['us']:9.1f} us {row['calls']:5d}x  {row['name']}")
        graph = torch.cuda.CUDAGraph()
        with pdl.warmup():  # the kernel variants the capture launches
            step()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            step()
        r["graph_ms"] = cuda_time(graph.replay, reps=20) * 1e3
        print(f"  graph step {r['graph_ms']:.2f} ms")
        r["graph_ms_plain_pointwise"] = graph_ms_with(model, step, pointwise=None)
        print(f"  graph step without the fused pointwise ops {r['graph_ms_plain_pointwise']:.2f} ms")
        if args.compile:
            try:
                t0 = time.perf_counter()
                fwd = torch.compile(model.forward, dynamic=False)
                step(fwd)
                r["compile_s"] = time.perf_counter() - t0
                _, count_c, busy_c = kernel_table(lambda: step(fwd))
                g2 = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g2):
                    step(fwd)
                r["compiled_graph_ms"] = cuda_time(g2.replay, reps=20) * 1e3
                r["compiled_kernels_per_step"] = count_c
                print(
                    f"  compiled: {r['compile_s']:.0f} s compile, {count_c} kernels, busy {busy_c:.2f} ms, graph {r['compiled_graph_ms']:.2f} ms"
                )
            except Exception as e:  # report, keep the rest of the run
                r["compile_error"] = repr(e)[:2000]
                print("  compile failed:", repr(e)[:2000])
        res[batch] = r
        Path(args.out, "profile_decode.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
