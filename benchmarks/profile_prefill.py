# ruff: noqa: B023
"""Where a long prefill spends its time, at the real 4B shape: one 8K chunk at context 8K (the steady
state of a long prompt: every sliding-window layer attends over a full window) and a whole 32K
prompt in 8K chunks. For each: synchronised wall time, host time to enqueue, GPU busy time (sum of
kernel times), and the top kernels.

    python benchmarks/profile_prefill.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_gpu import build_model, chunk_inputs, load_cfg, prefill, random_state
from profile_decode import kernel_table


def gap_table(fn, top: int = 15) -> dict:
    """GPU idle gaps between consecutive kernels of one call of fn (CPU + CUDA trace): a histogram,
    the total, and the largest gaps with the host-side calls that overlap each."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = list(prof.events())
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA
    )
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    gaps = [
        (b[0] - a[1], a[1], b[0], a[2][:60], b[2][:60]) for a, b in zip(kernels, kernels[1:], strict=False)
    ]
    bins = {"<5us": 0.0, "5-50us": 0.0, "50-500us": 0.0, ">500us": 0.0}
    for g in gaps:
        key = "<5us" if g[0] < 5 else "5-50us" if g[0] < 50 else "50-500us" if g[0] < 500 else ">500us"
        bins[key] += g[0] / 1e3
    rows = []
    for g, t0, t1, before, after in sorted(gaps, reverse=True)[:top]:
        during = sorted(
            ((min(e.time_range.end, t1) - max(e.time_range.start, t0), e.name) for e in cpu
             if e.time_range.start < t1 and e.time_range.end > t0),
            reverse=True,
        )  # fmt: skip
        rows.append(
            {"gap_us": g, "after_kernel": before, "before_kernel": after, "host": [n for _, n in during[:6]]}
        )
    span = (kernels[-1][1] - kernels[0][0]) / 1e3
    busy = sum(k[1] - k[0] for k in kernels) / 1e3
    return {"span_ms": span, "busy_ms": busy, "gap_ms_by_size": bins, "largest": rows}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--chunk", type=int, default=8192)
    args = ap.parse_args()
    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, 2)
    n = args.chunk
    ids, pos, meta = chunk_inputs(n, 8192)

    def chunk_at_8k():
        hidden = model.forward(ids, pos, meta, state)
        model.compute_logits(hidden[meta.logits_indices])

    def prompt_32k():
        prefill(model, state, [0], 32768, n)

    res = {"chunk": n}
    for name, fn, reps in (("chunk_8k_at_ctx_8k", chunk_at_8k, 5), ("prompt_32k", prompt_32k, 2)):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / reps * 1e3
        t0 = time.perf_counter()
        fn()
        host = (time.perf_counter() - t0) * 1e3  # host time to enqueue (the 32K case syncs only at the end)
        torch.cuda.synchronize()
        top, count, busy = kernel_table(fn, top=30)
        res[name] = {"wall_ms": wall, "enqueue_ms": host, "kernels": count, "gpu_busy_ms": busy, "top": top}
        print(f"{name}: wall {wall:.1f} ms, enqueue {host:.1f} ms, {count} kernels, GPU busy {busy:.1f} ms")
        for row in top:
            print(f"  {row['us']:9.1f} us {row['calls']:5d}x  {row['name']}")
        gaps = gap_table(fn)
        res[name]["gaps"] = gaps
        print(
            f"  kernel span {gaps['span_ms']:.1f} ms, busy {gaps['busy_ms']:.1f} ms, gaps {gaps['gap_ms_by_size']}"
        )
        for row in gaps["largest"]:
            print(
                f"  gap {row['gap_us']:8.1f} us  {row['after_kernel']} -> {row['before_kernel']}  host: {row['host']}"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_prefill.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
