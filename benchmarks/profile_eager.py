"""Host cost of eager forwards at the real shape (CUDA only): every step that carries a prefill chunk runs
without a CUDA graph, and its launch alone holds the host for tens of ms (docs/benchmarks.md), which is
what the inter-token latency tails of the HTTP runs are made of.
The prefill cases are then timed with fla's forward called directly and with its public wrapper
(TritonBackend.fla_direct on and off) in alternating rounds, and the mixed step is profiled both ways.
With --piecewise, the steps of up to the largest of --piecewise-sizes tokens (default 1024; the
server's --piecewise-max-tokens is 2048) are also timed through the piecewise CUDA graphs
(serving.piecewise_graph) against the eager forward.

For each case: the host time to enqueue one forward (no wait), and the wall time from the first kernel's
enqueue to the last kernel's end; a case whose enqueue time is close to its wall time is host-bound.
Then the Python functions that take the enqueue time of the mixed step (cProfile, by own time and by
cumulative time), which says where the host goes: our model code, Triton's launcher, fla's wrappers or
torch's dispatcher.

    python benchmarks/profile_eager.py --out DIR [--cases ...] [--ab-rounds 4] [--piecewise]
        [--piecewise-sizes 64,256,512,1024,2048]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_gpu import build_model, load_cfg, random_state, text_positions

from model.backends.triton_backend import FLA_FORWARD
from model.batch import BatchMeta

DEV = "cuda"


def case_inputs(decode_rows: int, prefill_tokens: int, ctx: int = 1024):
    """(ids, positions, meta) of `decode_rows` decode rows at context ctx, then one fresh prefill chunk."""
    slots = list(range(decode_rows + (1 if prefill_tokens else 0)))
    lens = [1] * decode_rows + ([prefill_tokens] if prefill_tokens else [])
    ctxs = [ctx] * decode_rows + ([0] if prefill_tokens else [])
    meta = BatchMeta.build(slots, lens, ctxs, DEV)
    ids = torch.randint(0, 150000, (sum(lens),), device=DEV)
    return ids, text_positions(ctxs, lens), meta


def time_case(step, reps: int = 5) -> dict[str, float]:
    """Median host enqueue ms and median wall ms (events around the enqueue, waited for)."""
    step()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        b.record()
        b.synchronize()
        wall.append(a.elapsed_time(b))
    return {"host_enqueue_ms": statistics.median(host), "wall_ms": statistics.median(wall)}


def alternating_rounds(ways: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict]:
    """Each way's timings (a `time_case` dict per call) over `rounds` rounds, the order of the ways
    reversed every other round: {way: {key: [one value per round]}}."""
    got: dict[str, dict[str, list[float]]] = {w: {} for w in ways}
    names = list(ways)
    for i in range(rounds):
        for w in names if i % 2 == 0 else names[::-1]:
            for key, value in ways[w]().items():
                got[w].setdefault(key, []).append(value)
    return got


def python_profile(step, top: int = 30) -> dict[str, str]:
    """cProfile of one enqueue, by own time and by cumulative time."""
    step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    torch.cuda.synchronize()
    out = {}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
        out[key] = buf.getvalue()
    return out


def piecewise_ab(model, state, cases: dict, rounds: int, sizes=(64, 256, 512, 1024)) -> dict:
    """The steps with prefill rows of up to max(sizes) tokens through the piecewise CUDA graphs
    (serving.piecewise_graph) against the eager forward, in alternating rounds: host enqueue and wall
    ms (medians of the rounds' medians), the capture time and the memory the graphs hold."""
    from serving.piecewise_graph import PiecewiseGraphRunner

    torch.cuda.synchronize()
    mem0, t0 = torch.cuda.memory_allocated(), time.perf_counter()
    runner = PiecewiseGraphRunner(model, state, DEV, sizes=sizes)
    out: dict = {
        "sizes": list(sizes),
        "capture_s": time.perf_counter() - t0,
        "memory_mib": (torch.cuda.memory_allocated() - mem0) / 2**20,
        "cases": {},
    }
    print(f"piecewise graphs: captured in {out['capture_s']:.1f} s, {out['memory_mib']:.0f} MiB", flush=True)
    for name, (rows, tokens) in cases.items():
        if tokens == 0 or not runner.can_run(rows + tokens):
            continue
        ids, pos, meta = case_inputs(rows, tokens)
        ways = {
            "eager": lambda ids=ids, pos=pos, meta=meta: model.forward(ids, pos, meta, state),
            "piecewise": lambda ids=ids, pos=pos, meta=meta: runner.forward(ids, pos, meta),
        }
        got = alternating_rounds({w: lambda f=f: time_case(f) for w, f in ways.items()}, rounds)
        # the fresh prompt's rows (its state starts from zero in both, the decode rows' state moved on)
        ref, new = ways["eager"]()[-tokens:].float(), ways["piecewise"]()[-tokens:].float()
        err = ((new - ref).norm() / ref.norm()).item()
        out["cases"][name] = {"rounds": got, "rel_err_hidden": err}
        med = {w: {k: statistics.median(v) for k, v in got[w].items()} for w in got}
        print(
            f"{name}: host enqueue eager {med['eager']['host_enqueue_ms']:.1f} ms, piecewise "
            f"{med['piecewise']['host_enqueue_ms']:.1f} ms; wall {med['eager']['wall_ms']:.1f} / "
            f"{med['piecewise']['wall_ms']:.1f} ms; hidden rel err {err:.1e}",
            flush=True,
        )
    return out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--cases", help="comma-separated case names to run (default: all)")
    ap.add_argument("--ab-rounds", type=int, default=4, help="alternating rounds of the A/Bs")
    ap.add_argument("--piecewise", action="store_true", help="A/B of the piecewise CUDA graphs")
    ap.add_argument("--piecewise-sizes", default="64,256,512,1024", help="step sizes the graphs capture")
    args = ap.parse_args()
    cfg = load_cfg()
    model = build_model(cfg)
    model.backend.fla_direct = FLA_FORWARD is not None  # the A/B below turns it off
    state = random_state(cfg, 80)
    cases = {
        "decode b1": (1, 0),
        "decode b64": (64, 0),
        "prefill 256": (0, 256),
        "mixed 64 + 512": (64, 512),
        "mixed 64 + 2048": (64, 2048),
        "prefill 2048": (0, 2048),  # a long prompt's chunk at the default step budget
        "mixed 64 + 1984": (64, 1984),  # a full default step budget of 2048 tokens
        "prefill 8192": (0, 8192),
    }
    if args.cases:
        chosen = args.cases.split(",")
        if not set(chosen) <= cases.keys() or "mixed 64 + 512" not in chosen:
            raise SystemExit(f"--cases: choose from {list(cases)}, with 'mixed 64 + 512' (profiled)")
        cases = {k: v for k, v in cases.items() if k in chosen}
    res: dict = {"device": torch.cuda.get_device_name(), "cases": {}}
    steps = {}
    for name, (rows, tokens) in cases.items():
        ids, pos, meta = case_inputs(rows, tokens)

        def step(ids=ids, pos=pos, meta=meta):
            hidden = model.forward(ids, pos, meta, state)
            return model.compute_logits(hidden[meta.logits_indices])

        steps[name] = step
        r = time_case(step)
        res["cases"][name] = r
        print(f"{name}: host enqueue {r['host_enqueue_ms']:.1f} ms, wall {r['wall_ms']:.1f} ms", flush=True)
    # A/B: fla's public wrapper instead of its forward called directly (TritonBackend.fla_direct), in
    # alternating rounds (the order of the two settings flips each round); median of the rounds' medians
    if model.backend.fla_direct:

        def timed_with(flag: bool, step) -> Callable[[], dict[str, float]]:
            def run() -> dict[str, float]:
                model.backend.fla_direct = flag
                return time_case(step)

            return run

        res["fla_direct_ab"] = {}
        for name in [c for c in ("prefill 256", "mixed 64 + 512", "mixed 64 + 2048") if c in steps]:
            got = alternating_rounds(
                {"direct": timed_with(True, steps[name]), "wrapper": timed_with(False, steps[name])},
                args.ab_rounds,
            )
            res["fla_direct_ab"][name] = got
            on, off = (statistics.median(got[w]["host_enqueue_ms"]) for w in ("direct", "wrapper"))
            print(
                f"{name}: host enqueue direct {on:.1f} ms, fla wrapper {off:.1f} ms ({args.ab_rounds} rounds)"
            )
        for flag in (False, True):  # the mixed step's profile with the wrapper, then direct
            model.backend.fla_direct = flag
            res[f"python_profile_mixed_64_512_{'direct' if flag else 'wrapper'}"] = python_profile(
                steps["mixed 64 + 512"]
            )
    if args.piecewise:
        sizes = tuple(int(s) for s in args.piecewise_sizes.split(","))
        res["piecewise"] = piecewise_ab(model, state, cases, args.ab_rounds, sizes)
    # the default settings' profile: the A/B's direct one where it ran (fla_direct is on by default)
    prof = res.get("python_profile_mixed_64_512_direct") or python_profile(steps["mixed 64 + 512"])
    res["python_profile_mixed_64_512"] = prof
    print(prof["tottime"][:6000])
    print(prof["cumulative"][:6000])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_eager.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
