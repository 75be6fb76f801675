"""Host cost of one engine decode step with the model stubbed out (any CPU, no server).

B requests of the embedded tiny checkpoint are prefilled, then the runner's launch_forward (and launch
and execute, which engines before async scheduling and before a828014 call) is replaced by a stub that
returns random tokens at once, decode steps counting as CUDA-graph replays as on a GPU, and
`EngineCore.step()` is timed: the whole step (scheduling, bookkeeping, detokenization, deltas), and the
part on the device's critical path, which leaves out the output work that the engine overlaps with
the device (`_emit_pending`, where it exists).

    python benchmarks/bench_engine_step.py --batches 64,256
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(batch: int, steps: int) -> tuple[float, float]:
    """(median seconds of step(), median seconds of step() minus its overlapped emit)."""
    from model.tiny import default_tiny_checkpoint_dir
    from serving.llm import LLM, Prompt
    from serving.runner import SampledToken
    from serving.types import SamplingParams

    llm = LLM(str(default_tiny_checkpoint_dir()), max_num_seqs=batch)
    core = llm.core
    params = SamplingParams(max_tokens=100_000, ignore_eos=True, temperature=0.0)
    for i in range(batch):
        request = llm.make_request(Prompt(messages=[{"role": "user", "content": f"hello {i}"}]), params)
        core.add(request, lambda d: None)  # the deltas are dropped (the prefill's first tokens too)
    while core.scheduler.num_waiting or any(r.sched.is_prefilling for r in core.requests.values()):
        core.step()
    rng = random.Random(0)

    class Done:
        def __init__(self, tokens: list) -> None:
            self.tokens = tokens

        def result(self) -> list:
            return self.tokens

    def launch(b, reqs):
        return Done([SampledToken(r.request_id, r.choice, rng.randrange(200, 2000), None) for r in b.rows])

    class Forward:
        def __init__(self, b) -> None:
            self.b = b

        def sample(self, reqs) -> Done:
            return launch(self.b, reqs)

    core.runner.launch_forward = lambda b, reqs, prev=None: Forward(b)
    core.runner.launch_is_host_bound = lambda b: not b.is_decode_only
    core.runner.launch = launch
    core.runner.execute = lambda b, reqs: launch(b, reqs).result()
    emit_s = [0.0]
    emit = getattr(core, "_emit_pending", None)
    if emit is not None:

        def timed_emit() -> None:
            t = time.perf_counter()
            emit()
            emit_s[0] += time.perf_counter() - t

        core._emit_pending = timed_emit
    whole, critical = [], []
    for _ in range(steps):
        emit_s[0] = 0.0
        t0 = time.perf_counter()
        core.step()
        dt = time.perf_counter() - t0
        whole.append(dt)
        critical.append(dt - emit_s[0])
    return statistics.median(whole[10:]), statistics.median(critical[10:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    print("| batch | whole step us | critical path us |")
    print("|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        whole, critical = measure(b, args.steps)
        print(f"| {b} | {whole * 1e6:.0f} | {critical * 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
