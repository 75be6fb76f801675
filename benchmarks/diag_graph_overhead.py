# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Why a CudaGraphRunner step (bench_gpu's decode table) takes longer than a bare captured step
(ab_decode.py): times, at context 1K, (1) runner.run (input copies + replay) and runner.run_host (host
lists, one pinned copy), (2) the runner's graph replayed alone, (3) a bare graph of model.forward +
compute_logits captured on the default stream; then the host time of run_host's parts (staging wait,
numpy fill, pinned copy, event record, replay call; median of 50, the GPU idle before each), the step
with the event recorded after the launch instead, the same steps with the pinned copy enqueued by a
direct cudaMemcpyAsync (no torch dispatch or host-allocator event; where libcudart is found), and
back-to-back run_host steps (host work overlapping the GPU, as a pipelined serving loop runs them);
last, as a torch.profiler run leaves host overhead behind in the process, profiles (1) and (3) and
lists the kernels that differ.

    python benchmarks/diag_graph_overhead.py --out DIR [--batches 1,64]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import statistics
import time
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


def _cudart():
    """The process's libcudart (the one torch loaded), or None."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    for pattern in ("nvidia/cu*/lib/libcudart.so*", "nvidia/cuda_runtime/lib/libcudart.so*"):
        for path in sorted(glob.glob(os.path.join(site, pattern))):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    try:
        return ctypes.CDLL("libcudart.so")
    except OSError:
        return None


def host_parts(runner, batch: int, host, cudart) -> dict:
    """Median host microseconds of run_host's parts, the GPU idle before each call; the GPU time of the
    step with the event recorded before or after the launch, with torch's copy or a direct
    cudaMemcpyAsync (if cudart); the time per step of back-to-back run_host calls."""
    ids, pos, slots, ctx = host
    parts: dict[str, list[float]] = {}
    stream = torch.cuda.current_stream()
    staging = runner._staging[0]  # one twin: the GPU is idle before each call
    nbytes = staging.numel() * staging.element_size()
    free = torch.cuda.Event()

    def raw_copy():
        err = cudart.cudaMemcpyAsync(
            ctypes.c_void_p(runner._static.data_ptr()),
            ctypes.c_void_p(staging.data_ptr()),
            ctypes.c_size_t(nbytes),
            ctypes.c_int(1),  # cudaMemcpyHostToDevice
            ctypes.c_void_p(stream.cuda_stream),
        )
        if err:
            raise RuntimeError(f"cudaMemcpyAsync: error {err}")

    def one(copy, record_first: bool = True) -> None:
        t = [time.perf_counter()]
        free.synchronize()
        t.append(time.perf_counter())
        h = runner._staging_np[0]
        h[0, :batch] = ids
        h[1:4, :batch] = pos
        h[4, :batch] = slots
        h[5, :batch] = ctx
        t.append(time.perf_counter())
        copy()
        t.append(time.perf_counter())
        if record_first:  # as run_host does: the event between the copy and the launch
            free.record()
            t.append(time.perf_counter())
        runner._graphs[batch].replay()
        t.append(time.perf_counter())
        if not record_first:  # the candidate: recorded after the launch (needs two staging twins)
            free.record()
            t.append(time.perf_counter())
        order = ("record", "replay") if record_first else ("replay", "record")
        for name, a, b in zip(("wait", "fill", "copy", *order), t, t[1:], strict=False):
            parts.setdefault(name, []).append((b - a) * 1e6)

    def torch_copy():
        runner._static.copy_(staging, non_blocking=True)

    for _ in range(50):
        one(torch_copy)
        torch.cuda.synchronize()
    out = {f"host_{k}_us": statistics.median(v) for k, v in parts.items()}
    out["gpu_step_torch_copy_ms"] = cuda_time(lambda: one(torch_copy), reps=30) * 1e3
    out["gpu_step_record_after_ms"] = cuda_time(lambda: one(torch_copy, False), reps=30) * 1e3
    if cudart is not None:
        out["gpu_step_raw_copy_ms"] = cuda_time(lambda: one(raw_copy), reps=30) * 1e3
        out["gpu_step_raw_copy_record_after_ms"] = cuda_time(lambda: one(raw_copy, False), reps=30) * 1e3
    out["back_to_back_step_ms"] = back_to_back_ms(runner, host)
    return out


def back_to_back_ms(runner, host, steps: int = 40) -> float:
    """ms per `run_host(*host)` step with `steps` enqueued back to back: the host preparing step k+1
    while the GPU runs step k, as a pipelined serving loop issues them."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.run_host(*host)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


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
    cudart = _cudart()
    res, timed = [], []
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

        def run(ids=ids, pos=pos, slots=slots, ctx=ctx):  # bound now: profiled after the loop
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
        row["host_parts"] = host_parts(runner, batch, host, cudart)
        timed.append((row, run, bare))
    for row, run, bare in timed:  # profiles last: torch.profiler leaves host overhead behind
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
