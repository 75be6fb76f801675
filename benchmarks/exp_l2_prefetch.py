# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Experiment: prefetch the next GEMM's weight into L2 on a side stream during a decode step.

After GEMM j is enqueued (mode "after") or before it (mode "before"), a prefetch of the first
`budget` bytes of GEMM j+1's weight is forked onto a side stream, so it runs while the small kernels
between the two GEMMs (or GEMM j itself) leave HBM partly idle. The GEMM order is recorded from one
eager step. Every F.linear of the decoder goes through the hook (the LM head is the last target).
Checks that logits are bit-identical with and without prefetch, then times graph-captured steps.

    python benchmarks/exp_l2_prefetch.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_gpu import DEV, build_model, cuda_time, decode_floor_s, load_cfg, random_state
from l2_prefetch import L2Prefetch

from model.batch import BatchMeta
from serving.cuda_graph import CudaGraphRunner

ORIG_LINEAR = F.linear


class Prefetcher:
    """F.linear hook: fork a prefetch of the next recorded weight on a side stream."""

    def __init__(self, model, kind: str, programs: int, budget: int, mode: str, max_rows: int) -> None:
        self.model, self.budget, self.mode, self.max_rows = model, budget, mode, max_rows
        self.launch = L2Prefetch(kind, DEV, programs)
        self.side = torch.cuda.Stream(DEV)
        self.pending = False
        self.next: dict[int, torch.Tensor] = {}
        self.calls = 0

    def record(self) -> None:
        order: list[torch.Tensor] = []

        def rec(x, w, b=None):
            order.append(w)
            return ORIG_LINEAR(x, w, b)

        F.linear = rec
        try:
            meta = BatchMeta.build([0], [1], [5], DEV)
            state = random_state(self.model.config, 1)
            ids = torch.zeros(1, dtype=torch.int64, device=DEV)
            pos = torch.full((3, 1), 5, dtype=torch.int64, device=DEV)
            with torch.inference_mode():
                self.model.forward(ids, pos, meta, state)
            del state
        finally:
            F.linear = ORIG_LINEAR
        order.append(self.model.model.embed_tokens.weight)  # the LM head reads it last
        for a, b in zip(order[:-1], order[1:], strict=True):
            self.next[a.data_ptr()] = b
        self.order_len = len(order)

    def _fork(self, w: torch.Tensor) -> None:
        nxt = self.next.get(w.data_ptr())
        if nxt is None:
            return
        main = torch.cuda.current_stream(DEV)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            self.launch(nxt, self.budget)
        self.pending = True
        self.calls += 1

    def join(self) -> None:
        if self.pending:
            torch.cuda.current_stream(DEV).wait_stream(self.side)
            self.pending = False

    def linear(self, x, w, b=None):
        if x.shape[0] > self.max_rows:
            return ORIG_LINEAR(x, w, b)
        if self.mode == "before":
            self.join()
            self._fork(w)
            return ORIG_LINEAR(x, w, b)
        y = ORIG_LINEAR(x, w, b)
        self.join()
        self._fork(w)
        return y

    def install(self) -> None:
        F.linear = self.linear
        self._orig_logits = self.model.compute_logits

        def logits(hidden):
            self.join()
            return self._orig_logits(hidden)

        self.model.compute_logits = logits

    def uninstall(self) -> None:
        F.linear = ORIG_LINEAR
        self.model.compute_logits = self._orig_logits


def snapshot(state, n: int) -> list[torch.Tensor]:
    return [t[:, :n].clone() for t in (state.recurrent, state.conv, state.key, state.value)]


def restore(state, snap: list[torch.Tensor], n: int) -> None:
    for t, s in zip((state.recurrent, state.conv, state.key, state.value), snap, strict=True):
        t[:, :n].copy_(s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_cfg()
    model = build_model(cfg)
    batches = [1, 64, 128]
    state = random_state(cfg, max(batches))
    cases = [(1, 1024), (64, 1024), (128, 1024), (64, 8192)]
    MB = 1 << 20
    configs = [("none", 0, 0, "after")]
    for kind, programs, budget, mode in (
        ("load", 132, 16, "after"),
        ("load", 132, 32, "after"),
        ("load", 66, 16, "after"),
        ("load", 264, 16, "after"),
        ("load", 132, 8, "after"),
        ("load", 132, 32, "before"),
        ("line", 132, 16, "after"),
        ("line", 132, 32, "after"),
        ("bulk", 0, 16, "after"),
        ("bulk", 0, 32, "after"),
        ("bulk", 0, 48, "after"),
        ("bulk", 0, 32, "before"),
        ("bulk", 0, 64, "before"),
    ):
        configs.append((kind, programs, budget, mode))
    if args.quick:
        configs = configs[:3]
    results: dict = {"commit": args.commit, "device": torch.cuda.get_device_name(), "rows": []}
    ref_logits = None
    snap = snapshot(state, 64)
    for kind, programs, budget, mode in configs:
        name = f"{kind}/{programs}/{budget}MB/{mode}"
        pf = None
        t0 = time.perf_counter()
        try:
            if kind != "none":
                pf = Prefetcher(model, kind, programs, budget * MB, mode, max_rows=max(batches))
                pf.record()
                pf.install()
            runner = CudaGraphRunner(model, state, max_batch=max(batches), device=DEV, sizes=batches)
        except Exception as e:  # a variant that does not compile is a result, not a crash
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results["rows"].append({"config": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        finally:
            if pf is not None:
                pf.uninstall()
        capture_s = time.perf_counter() - t0
        # same state, same inputs: logits must be bit-identical with the baseline
        restore(state, snap, 64)
        ids = torch.arange(64, device=DEV) * 997 % 150000
        pos = torch.full((3, 64), 1024, dtype=torch.int64, device=DEV)
        slots = torch.arange(64, device=DEV)
        ctx_t = torch.full((64,), 1024, dtype=torch.int64, device=DEV)
        logits = runner.run(ids, pos, slots, ctx_t).clone()
        if ref_logits is None:
            ref_logits = logits
        identical = bool(torch.equal(logits, ref_logits))
        row = {"config": name, "capture_s": capture_s, "identical_logits_b64": identical, "steps": []}
        for batch, ctx in cases:
            ids = torch.randint(0, 150000, (batch,), device=DEV)
            pos = torch.full((3, batch), ctx, dtype=torch.int64, device=DEV)
            slots = torch.arange(batch, device=DEV)
            ctx_t = torch.full((batch,), ctx, dtype=torch.int64, device=DEV)
            sec = cuda_time(lambda: runner.run(ids, pos, slots, ctx_t), reps=30)
            floor = decode_floor_s(batch, ctx)
            row["steps"].append({"batch": batch, "ctx": ctx, "step_ms": sec * 1e3, "ratio": sec / floor})
        print(
            f"{name}: identical={identical} "
            + " ".join(
                f"b{s['batch']}@{s['ctx']}={s['step_ms']:.3f}ms({s['ratio']:.3f})" for s in row["steps"]
            ),
            flush=True,
        )
        results["rows"].append(row)
        runner = None  # free its graphs and buffers before the next capture
        torch.cuda.empty_cache()
        (out / f"gpu_h100_{args.commit}_exp_l2_prefetch.json").write_text(json.dumps(results, indent=1))
    (out / f"gpu_h100_{args.commit}_exp_l2_prefetch.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
