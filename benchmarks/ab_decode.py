# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""A/B of two decode-path switches of the Triton backend, on one GPU in one process: the gates computed
inside the delta-rule kernel (`gates_in_delta_rule`) and the tuned decode GEMM table (`gemm_table`).
Graph-captured steps at context 1K for the four on/off combinations, in rounds (every combination
once per round, three rounds), median per combination.

    python benchmarks/ab_decode.py --out DIR [--batches 1,8,64,128]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from bench_gpu import DEV, build_model, decode_floor_s, load_cfg, random_state
from profile_decode import graph_ms_with

from model.backends.gemm_table import DecodeGemmTable
from model.batch import BatchMeta


def switches(gates: bool, table: bool) -> dict:
    """Backend attributes that turn the switches off (an absent key keeps the backend's own choice)."""
    attrs: dict = {}
    if not gates:
        attrs["gates_in_delta_rule"] = lambda meta: False
    if not table:
        attrs["gemm_table"] = DecodeGemmTable([])
    return attrs


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,8,64,128")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, max(batches))
    combos = [(False, False), (True, False), (False, True), (True, True)]
    rows = []
    for batch in batches:
        meta = BatchMeta.build(list(range(batch)), [1] * batch, [1024] * batch, DEV)
        ids = torch.randint(0, 150000, (batch,), device=DEV)
        pos = torch.full((3, batch), 1024, dtype=torch.int64, device=DEV)

        def step():
            return model.compute_logits(model.forward(ids, pos, meta, state))

        times: dict[tuple[bool, bool], list[float]] = {c: [] for c in combos}
        for _ in range(3):
            for c in combos:
                times[c].append(graph_ms_with(model, step, **switches(*c)))
        floor_ms = decode_floor_s(batch, 1024) * 1e3
        for (gates, table), ms in times.items():
            med = statistics.median(ms)
            row = {"batch": batch, "gates_in_rule": gates, "gemm_table": table, "ms": ms, "median_ms": med}
            row["ratio"] = med / floor_ms
            rows.append(row)
            print(
                f"b{batch} gates_in_rule={gates} gemm_table={table}: {med:.3f} ms ({row['ratio']:.3f})",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_decode.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
