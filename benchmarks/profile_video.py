# ruff: noqa: B023
"""Where a buffered video step (16 frames of 448x448: vision call + 4096-token prefill) spends time:
host wall time of each half (synchronised), GPU busy time and the top kernels of each half.

    python benchmarks/profile_video.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_gpu import BF16, DEV, build_model, load_cfg, random_state
from profile_decode import kernel_table

from model.batch import BatchMeta


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--frames", type=int, default=16)
    args = ap.parse_args()
    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, 1)
    f = args.frames
    n = 256 * f
    pixels = torch.randn(f * 1024, 1176, dtype=BF16, device=DEV)
    grid = torch.tensor([[f, 32, 32]])
    ids = torch.full((n,), cfg.text.video_token_id, dtype=torch.int64, device=DEV)
    pos = torch.arange(8192, 8192 + n, device=DEV).expand(3, n).contiguous()
    meta = BatchMeta.build([0], [n], [8192], DEV)
    feats = model.encode_vision(pixels, grid)

    def vision():
        return model.encode_vision(pixels, grid)

    def prefill():
        return model.forward(ids, pos, meta, state, inputs_embeds=feats)

    res = {}
    for name, fn in (("vision", vision), ("prefill", prefill)):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 3 * 1e3
        t0 = time.perf_counter()
        fn()
        host = (time.perf_counter() - t0) * 1e3  # host time to enqueue one call (GPU may lag)
        torch.cuda.synchronize()
        top, count, busy = kernel_table(fn, top=25)
        res[name] = {"wall_ms": wall, "enqueue_ms": host, "kernels": count, "gpu_busy_ms": busy, "top": top}
        print(f"{name}: wall {wall:.1f} ms, enqueue {host:.1f} ms, {count} kernels, GPU busy {busy:.1f} ms")
        for row in top:
            print(f"  {row['us']:9.1f} us {row['calls']:5d}x  {row['name']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_video.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
