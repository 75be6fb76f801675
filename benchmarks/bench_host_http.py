"""Host overhead of the serving stack, measured on any CPU: the real server (API, engine loop, scheduler,
detokenizer, SSE) with the GPU's share of each step simulated.

The server is `infinitevl serve` on the embedded tiny checkpoint, except that the model runner's launch
(forward + sampling) is replaced by a simulated device: a launch returns at once, the device is busy for
as long as the H100 took for that batch (decode graph steps at ec0681d, prefill at about 66k tokens/s;
docs/benchmarks.md), and waiting for the step's random tokens sleeps until then. A sleep releases the GIL
as a CUDA synchronisation does, so everything else the process does (the API thread's SSE work, the
engine thread's bookkeeping, their contention for the GIL) costs what it costs in production. Each client
count reports the time the simulated device sat idle between decode steps (what the host adds to each
step), the engine's time per output token (from /metrics) and the clients' inter-token latency.

`--eager-launch-ms X` models the host cost of an eager forward on the GPU: a step with prefill rows is not
a graph replay, so enqueueing it keeps the host busy (the GIL held, as Python launch code holds it) for X
ms, and the device cannot finish it sooner (on the H100 an eager decode step of batch 1 took 25-36 ms of
host time and a 4096-token prefill 72 ms; docs/benchmarks.md). 0, the default, keeps every launch free.

    python benchmarks/bench_host_http.py --clients 1,16,64 --out DIR
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# H100 decode step (ms) by batch size: bench_gpu at ec0681d, CUDA graph fed from host lists, context 1K
DECODE_MS = {1: 3.50, 8: 4.09, 32: 5.38, 64: 6.92, 128: 10.28, 256: 16.59}
PREFILL_TOK_PER_S = 66_000.0  # 0.6 of the 111k tokens/s floor


def gpu_step_s(num_decode_rows: int, num_prefill_tokens: int) -> float:
    """Simulated GPU time of one step: decode steps interpolated in the batch size, plus prefill tokens."""
    sec = num_prefill_tokens / PREFILL_TOK_PER_S
    if num_decode_rows:
        sizes = sorted(DECODE_MS)
        b = min(max(num_decode_rows, sizes[0]), sizes[-1])
        i = bisect.bisect_left(sizes, b)
        if sizes[i] == b:
            ms = DECODE_MS[b]
        else:
            lo, hi = sizes[i - 1], sizes[i]
            ms = DECODE_MS[lo] + (DECODE_MS[hi] - DECODE_MS[lo]) * (b - lo) / (hi - lo)
        sec += ms / 1e3
    return sec


class SimulatedStep:
    """A launched step: the device is busy until `ready`; `result()` waits for it as a sync would."""

    def __init__(self, ready: float, tokens: list) -> None:
        self.ready, self.tokens = ready, tokens

    def result(self) -> list:
        left = self.ready - time.perf_counter()
        if left > 0:
            time.sleep(left)  # releases the GIL, as waiting for the GPU does
        return self.tokens


class SimulatedForward:
    """A launched forward (ModelRunner.launch_forward): `sample()` hands back the step's tokens. A
    sampling enqueued after the forward has ended (async scheduling, with the host late) leaves the
    device idle until then: the gap goes to `late[0]` and the step's tokens are ready that much later."""

    def __init__(self, step: SimulatedStep, device_free: list[float], late: list[float]) -> None:
        self.step, self.device_free, self.late = step, device_free, late

    def sample(self, reqs) -> SimulatedStep:
        now = time.perf_counter()
        if now > self.step.ready:
            self.late[0] += now - self.step.ready
            self.step.ready = now
            self.device_free[0] = max(self.device_free[0], now)
        return self.step


def simulated_launch(
    vocab_low: int, vocab_high: int, log_path: str, seed: int = 0, eager_launch_ms: float = 0.0
):
    """A ModelRunner.launch_forward that returns at once while the simulated device works for the
    step's time, then yields random tokens (the device works asynchronously, as a GPU does); the
    sampling is counted in the step's time. With async scheduling the engine launches a step while
    the one before is still queued: the simulated device starts it when that one ends.

    Appends one line per decode-only step to log_path: batch size, and the time the simulated device
    sat idle before this step (the host's share of the step loop, waits for the GIL included)."""
    from serving.runner import SampledToken

    rng = random.Random(seed)
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - open for the server's lifetime
    device_free = [0.0]  # when the simulated device finishes its queued work
    late = [0.0]  # device idle waiting for a sampling launch since the last logged step

    def launch(batch, reqs, prev=None):  # (ScheduledBatch, dict[str, EngineRequest], ...) -> forward
        decode = sum(1 for r in batch.rows if not r.is_prefill)
        prefill = sum(r.num_tokens for r in batch.rows if r.is_prefill)
        start = time.perf_counter()
        if prefill and eager_launch_ms > 0:  # an eager forward: the host enqueues it kernel by kernel
            end = start + eager_launch_ms / 1e3
            while time.perf_counter() < end:
                pass
        now = time.perf_counter()
        if device_free[0] and not prefill:
            log.write(f"{decode} {max(0.0, now - device_free[0]) + late[0]:.6f}\n")
        late[0] = 0.0
        # the device starts the step when its first kernels arrive and ends it no sooner than the launch
        device_free[0] = max(now, max(start, device_free[0]) + gpu_step_s(decode, prefill))
        out = []
        for row in batch.rows:
            if not row.is_sampled:
                continue
            choices = range(reqs[row.request_id].sched.num_choices) if row.is_prefill else (row.choice,)
            out.extend(
                SampledToken(row.request_id, c, rng.randrange(vocab_low, vocab_high), None) for c in choices
            )
        return SimulatedForward(SimulatedStep(device_free[0], out), device_free, late)

    return launch


def serve(
    argv: list[str], vocab_low: int, vocab_high: int, log_path: str, eager_launch_ms: float = 0.0
) -> None:
    """`infinitevl serve argv...` with the simulated runner (the child process of main)."""
    import serving.build as build
    from serving import cli

    real_build = build.build_engine

    def build_engine(config, metrics=None):
        stack = real_build(config, metrics)
        launch_forward = simulated_launch(vocab_low, vocab_high, log_path, eager_launch_ms=eager_launch_ms)
        runner = stack.core.runner
        runner.launch_forward = launch_forward
        # as on a GPU with CUDA graphs: only decode-only steps replay a graph
        runner.launch_is_host_bound = lambda batch: not batch.is_decode_only
        # engines before async scheduling call launch (forward and sampling), engines before a828014
        # execute (launch and wait): the same device, for A/Bs across commits
        runner.launch = lambda batch, reqs: launch_forward(batch, reqs).sample(reqs)
        runner.execute = lambda batch, reqs: launch_forward(batch, reqs).sample(reqs).result()
        return stack

    build.build_engine = build_engine
    sys.exit(cli.main(["serve", *argv]))


def engine_tpot(url: str) -> tuple[float, float]:
    """(sum, count) of the engine's time-per-output-token histogram."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    vals = {}
    for name in ("sum", "count"):
        m = re.search(rf"^infinitevl:time_per_output_token_seconds_{name}\{{[^}}]*\}} (\S+)$", text, re.M)
        vals[name] = float(m.group(1)) if m else 0.0
    return vals["sum"], vals["count"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--out", default="")
    ap.add_argument("--serve", default="", help=argparse.SUPPRESS)  # child: run the server, log steps here
    ap.add_argument("--server-args", default="", help="extra `infinitevl serve` arguments")
    ap.add_argument(
        "--eager-launch-ms", type=float, default=0.0, help="host time of an eager (prefill) launch"
    )
    args = ap.parse_args()
    vocab = (1000, 2000)  # ordinary tokens of the tiny tokenizer (bench_http's prompt range)
    clients = [int(c) for c in args.clients.split(",")]
    serve_argv = ["--port", str(args.port), "--max-num-seqs", str(max(clients)), "--log-level", "warning"]
    serve_argv += args.server_args.split()
    if args.serve:
        serve(serve_argv, *vocab, args.serve, args.eager_launch_ms)
        return
    step_log = Path(f"/tmp/bench_host_http_{os.getpid()}_steps.txt")
    step_log.write_text("")
    url = f"http://127.0.0.1:{args.port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(step_log), f"--server-args={args.server_args}",
                               "--clients", args.clients, "--port", str(args.port)], env=env)  # fmt: skip
    rows = []
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit("server exited")
            time.sleep(0.5)
        for c in clients:
            s0, n0 = engine_tpot(url)
            step_log.write_text("")
            with_json = Path(f"/tmp/bench_host_http_{os.getpid()}_c{c}.json")
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_http.py"), "--url", url,
                   "--clients", str(c), "--requests", str(max(c, 4)), "--prompt-len", str(args.prompt_len),
                   "--output-len", str(args.output_len), "--out", str(with_json)]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True)
            res = json.loads(with_json.read_text())
            with_json.unlink()
            s1, n1 = engine_tpot(url)
            gpu_ms = gpu_step_s(c, 0) * 1e3
            row = {
                "clients": c,
                "ok": res["ok"],
                "simulated_gpu_step_ms": gpu_ms,
                "engine_tpot_ms": (s1 - s0) / max(n1 - n0, 1) * 1e3,
                "client_itl_p50_ms": res["itl_ms"]["p50"],
                "client_itl_p99_ms": res["itl_ms"]["p99"],
                "ttft_p50_ms": res["ttft_ms"]["p50"],
                "output_tok_per_s": res["output_tok_per_s"],
            }
            # device idle time before decode steps of the full batch (steady state); the keys keep the
            # names of the raw files already written
            gaps = [
                float(g) for b, g in (ln.split() for ln in step_log.read_text().splitlines()) if int(b) == c
            ]
            row["decode_steps"] = len(gaps)
            row["host_ms_per_step_p50"] = statistics.median(gaps) * 1e3 if gaps else float("nan")
            row["host_ms_per_step_p90"] = sorted(gaps)[int(0.9 * len(gaps))] * 1e3 if gaps else float("nan")
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        step_log.unlink(missing_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "cpus": os.cpu_count(),
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "server_args": args.server_args,
        "eager_launch_ms": args.eager_launch_ms,
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        "| clients | simulated GPU step ms | device idle ms per step p50 / p90 | engine TPOT ms | client ITL p50 / p99 ms |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['simulated_gpu_step_ms']:.2f} | {r['host_ms_per_step_p50']:.2f} / "
            f"{r['host_ms_per_step_p90']:.2f} | {r['engine_tpot_ms']:.2f} | "
            f"{r['client_itl_p50_ms']:.2f} / {r['client_itl_p99_ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
