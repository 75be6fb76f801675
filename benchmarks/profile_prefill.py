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
from bench_gpu import DEV, build_model, load_cfg, prefill, random_state, text_positions
from profile_decode import kernel_table

from model.batch import BatchMeta


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
    meta = BatchMeta.build([0], [n], [8192], DEV)
    ids = torch.randint(0, 150000, (n,), device=DEV)
    pos = text_positions([8192], [n])

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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_prefill.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
