"""Find where a step's launch makes the host wait for the GPU (CUDA only).

The engine overlaps host work with the device only if enqueueing a step never waits for kernels already
queued. This runs the tiny checkpoint through the engine on the GPU (Triton backend, CUDA graphs) with
prefill, chunked prefill, decode and mixed steps, seeded sampling and penalties, and for every launch:
  - queues ~SLEEP_MS of GPU work first (torch.cuda._sleep) and times the launch: a launch that takes
    about that long waited for the queue;
  - turns on torch's sync debug mode, and prints the stack of each synchronising call, once per place.

    python benchmarks/find_host_syncs.py [--async-scheduling]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
import traceback
import warnings

import torch

SLEEP_MS = 50.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--async-scheduling", action="store_true")
    args = ap.parse_args()

    from model.tiny import write_tiny_checkpoint
    from serving.llm import LLM
    from serving.types import SamplingParams

    ckpt = write_tiny_checkpoint(tempfile.mkdtemp(), seed=0)
    llm = LLM(
        str(ckpt),
        device="cuda",
        max_num_seqs=8,
        max_num_batched_tokens=64,
        async_scheduling=args.async_scheduling,
    )
    runner = llm.core.runner
    # cycles per ms, roughly: calibrate torch.cuda._sleep
    torch.cuda.synchronize()
    t = time.perf_counter()
    torch.cuda._sleep(10_000_000)
    torch.cuda.synchronize()
    cycles_per_ms = 10_000_000 / ((time.perf_counter() - t) * 1e3)

    places: collections.Counter[str] = collections.Counter()
    timings: list[tuple[str, float]] = []
    original = runner.launch_forward

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ARG001
        stack = "".join(traceback.format_stack(limit=14)[:-2])
        if stack not in places:
            print(f"--- sync: {message}\n{stack}")
        places[stack] += 1

    def launch_forward(batch, reqs, prev=None):  # noqa: ANN001
        kind = (
            "decode"
            if batch.is_decode_only
            else ("prefill" if all(r.is_prefill for r in batch.rows) else "mixed")
        )
        torch.cuda._sleep(int(SLEEP_MS * cycles_per_ms))
        torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        try:
            out = original(batch, reqs, prev)
            launched = out.sample(reqs) if not args.async_scheduling else None
        finally:
            torch.cuda.set_sync_debug_mode(0)
        timings.append((kind, (time.perf_counter() - t0) * 1e3))
        if launched is not None:  # sequential engine: it samples itself; hand back a fresh forward
            return _Relaunched(launched)
        return out

    class _Relaunched:
        def __init__(self, launched):  # noqa: ANN001
            self.launched = launched

        def sample(self, reqs):  # noqa: ANN001, ARG002
            return self.launched

    warnings.showwarning = show
    warnings.simplefilter("always")
    runner.launch_forward = launch_forward
    prompts = [[(13 * i + 7 * j) % 500 + 10 for j in range(5 + 37 * i)] for i in range(6)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_tokens=12, ignore_eos=True),
        SamplingParams(
            temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3, max_tokens=12, ignore_eos=True
        ),
        SamplingParams(temperature=0.0, repetition_penalty=1.2, min_tokens=4, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, n=2, seed=5, logprobs=3, max_tokens=12, ignore_eos=True),
    ]
    llm.generate(prompts, params)
    print(f"\n{len(places)} synchronising places, {sum(places.values())} calls")
    by_kind: dict[str, list[float]] = collections.defaultdict(list)
    for kind, ms in timings:
        by_kind[kind].append(ms)
    for kind, ms in sorted(by_kind.items()):
        ms.sort()
        print(
            f"{kind}: {len(ms)} launches, ms min/median/max {ms[0]:.2f}/{ms[len(ms) // 2]:.2f}/{ms[-1]:.2f}"
            f" (a wait for the queue shows as ~{SLEEP_MS:.0f} ms)"
        )


if __name__ == "__main__":
    main()
