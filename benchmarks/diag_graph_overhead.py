# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Why a CudaGraphRunner step (bench_gpu's decode table) takes longer than a bare captured step
(ab_decode.py): times, at context 1K, (1) runner.run (input copies + replay) and runner.run_host (host
lists, one pinned copy), (2) the runner's graph
replayed alone, (3) a bare graph of model.forward + compute_logits captured on the default stream;
then profiles (1) and (3) with torch.profiler and lists the kernels that differ.

    python benchmarks/diag_graph_overhead.py --out DIR [--batches 1,64]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from bench_gpu import DEV, build_model, cuda_time, decode_inputs, load_cfg, random_state

from model.backends.triton_kernels import pdl
from serving.cuda_graph import CudaGraphRunner


def kernels(fn) -> tuple[Counter, Counter, float]:
    """(calls per kernel name, GPU us per kernel name, GPU busy ms) of one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    calls, us = Counter(), Counter()
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.device_time_total > 0:
            calls[ev.name[:80]] += 1
            us[ev.name[:80]] += ev.device_time_total
    return calls, us, sum(us.values()) / 1e3


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,64")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, max(batches))
    runner = CudaGraphRunner(model, state, max_batch=max(batches), device=DEV, sizes=batches)
    res = []
    for batch in batches:
        ids, pos, meta = decode_inputs(batch, 1024)
        slots = torch.arange(batch, device=DEV)
        ctx = torch.full((batch,), 1024, dtype=torch.int64, device=DEV)

        def step():
            return model.compute_logits(model.forward(ids, pos, meta, state))

        with pdl.warmup():  # the kernel variants the capture launches
            step()
        bare = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bare):
            step()

        def run():
            return runner.run(ids, pos, slots, ctx)

        runner.run(ids, pos, slots, ctx)
        row = {"batch": batch}
        host = (ids.tolist(), [1024] * batch, list(range(batch)), [1024] * batch)
        for _ in range(2):  # twice, alternating, to see the spread
            row.setdefault("runner_run_ms", []).append(cuda_time(run, reps=30) * 1e3)
            row.setdefault("runner_run_host_ms", []).append(
                cuda_time(lambda: runner.run_host(*host), reps=30) * 1e3
            )
            row.setdefault("runner_replay_ms", []).append(
                cuda_time(runner._graphs[batch].replay, reps=30) * 1e3
            )
            row.setdefault("bare_replay_ms", []).append(cuda_time(bare.replay, reps=30) * 1e3)
        c_run, us_run, busy_run = kernels(run)
        c_bare, us_bare, busy_bare = kernels(bare.replay)
        row["busy_ms"] = {"runner_run": busy_run, "bare": busy_bare}
        row["kernels"] = {"runner_run": sum(c_run.values()), "bare": sum(c_bare.values())}
        names = set(us_run) | set(us_bare)
        diff = sorted(names, key=lambda n: -abs(us_run[n] - us_bare[n]))[:12]
        row["top_differences"] = [
            {
                "name": n,
                "runner_calls": c_run[n],
                "bare_calls": c_bare[n],
                "runner_us": us_run[n],
                "bare_us": us_bare[n],
            }
            for n in diff
        ]
        res.append(row)
        print(json.dumps(row, indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diag_graph_overhead.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
