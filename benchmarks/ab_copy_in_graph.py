"""A/B of `CudaGraphRunner(copy_in_graph=...)` on one GPU in one process: a decode step through
`run_host` (host lists, GPU idle before each step, as `bench_gpu.py` times it) with the pinned staging
copy issued by the host before the launch (off) against the same copy captured at the head of each
graph (on). Two runners over one random state at the real 4B shape, context 1K, in alternating rounds
(three by default), median per setting; then back-to-back steps (the host preparing step k+1 while the
GPU runs step k) for each.

    python benchmarks/ab_copy_in_graph.py --out DIR [--batches 1,64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from bench_gpu import build_model, cuda_time, decode_floor_s, load_cfg, random_state
from diag_graph_overhead import back_to_back_ms

from serving.cuda_graph import CudaGraphRunner


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, max(batches))
    runners = {
        flag: CudaGraphRunner(
            model, state, max_batch=max(batches), device="cuda", sizes=batches, copy_in_graph=flag
        )
        for flag in (False, True)
    }
    ctx = 1024
    times: dict[tuple[int, bool], list[float]] = {}
    for _ in range(args.rounds):
        for batch in batches:
            host = (
                torch.randint(0, 150000, (batch,)).tolist(),
                [ctx] * batch,
                list(range(batch)),
                [ctx] * batch,
            )
            for flag, runner in runners.items():
                sec = cuda_time(lambda runner=runner, host=host: runner.run_host(*host), reps=20)
                times.setdefault((batch, flag), []).append(sec * 1e3)
    rows = []
    for (batch, flag), ms in sorted(times.items()):
        host = (list(range(batch)), [ctx] * batch, list(range(batch)), [ctx] * batch)
        row = {
            "batch": batch,
            "copy_in_graph": flag,
            "ms": ms,
            "median_ms": statistics.median(ms),
            "ratio": statistics.median(ms) / (decode_floor_s(batch, ctx) * 1e3),
            "back_to_back_ms": back_to_back_ms(runners[flag], host),
        }
        rows.append(row)
        print(
            f"b{batch} copy_in_graph={flag}: {row['median_ms']:.3f} ms ({row['ratio']:.3f}), "
            f"back to back {row['back_to_back_ms']:.3f} ms",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "ctx": ctx, "rows": rows}
    (out / "ab_copy_in_graph.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
