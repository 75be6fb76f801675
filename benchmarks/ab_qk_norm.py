# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""A/B of the q/k L2 norm in the conv epilogue (`backend.qk_l2norm_in_conv` answering yes) against the
norm inside the delta-rule kernels, on the same GPU in one process: decode graph steps (batch 1, 64,
128 at context 1K) and one 8K prefill chunk at context 8K, alternating the two settings three times.
(At 998b1d8 the switch was a backend attribute, `fuses_qk_l2norm`, used for decode and prefill alike.)

    python benchmarks/ab_qk_norm.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from bench_gpu import build_model, chunk_inputs, cuda_time, decode_inputs, load_cfg, random_state
from profile_decode import graph_ms_with


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, 128)
    res: dict = {"decode": [], "prefill": {}}
    for batch in (1, 64, 128):
        ids, pos, meta = decode_inputs(batch, 1024)

        def step():
            return model.compute_logits(model.forward(ids, pos, meta, state))

        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(3):
            for fused in (True, False):
                times[fused].append(graph_ms_with(model, step, qk_l2norm_in_conv=lambda meta: fused))
        row = {"batch": batch, "fused_ms": times[True], "unfused_ms": times[False]}
        row["fused_median"], row["unfused_median"] = (
            statistics.median(times[True]),
            statistics.median(times[False]),
        )
        res["decode"].append(row)
        print(
            f"decode b{batch}: fused {row['fused_median']:.3f} ms, in-kernel norm {row['unfused_median']:.3f} ms"
        )
    n = 8192
    ids, pos, meta = chunk_inputs(n, 8192)
    times = {True: [], False: []}
    for _ in range(3):
        for fused in (True, False):
            model.backend.qk_l2norm_in_conv = lambda meta: fused
            times[fused].append(cuda_time(lambda: model.forward(ids, pos, meta, state), reps=5) * 1e3)
    del model.backend.qk_l2norm_in_conv  # back to the backend's own answer
    res["prefill"] = {"fused_ms": times[True], "unfused_ms": times[False]}
    print(
        f"prefill 8K at ctx 8K: fused {statistics.median(times[True]):.1f} ms, "
        f"in-kernel norm {statistics.median(times[False]):.1f} ms"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_qk_norm.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
