# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""A/B of programmatic dependent launch (triton_kernels/pdl.py) on the decode step, one GPU, one
process: PDL off, "wait_first", "trigger_first", and trigger_first with the decode GEMMs prefetching
the head of their weights into L2 before their wait, each with the shipped GEMM table and with a
table that sends every decode GEMM the tuner measured to the Triton GEMM (PDL cannot overlap a cuBLAS
kernel). Graph-captured steps at context 1K, in rounds (every variant once per round), median.

    python benchmarks/ab_pdl.py --out DIR [--batches 1,8,64,128] [--prefetch 65536,1048576]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from ab_decode import pdl_set
from bench_gpu import build_model, decode_floor_s, decode_inputs, load_cfg, random_state
from profile_decode import graph_ms_with

from model.backends.gemm_table import TABLE_SM90, DecodeGemmTable


def all_triton_table() -> DecodeGemmTable:
    """The shipped table with every linear bucket on the tuner's best Triton config."""
    entries = json.loads(TABLE_SM90.read_text())["entries"]
    out = []
    for e in entries:
        e = dict(e)
        if e.get("op", "linear") == "linear" and e.get("config") is None and e.get("triton_config"):
            e["config"] = e["triton_config"]
        out.append(e)
    return DecodeGemmTable(out)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,8,64,128")
    ap.add_argument("--prefetch", default="65536,1048576", help="GEMM L2 prefetch bytes per program")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    prefetches = [int(p) for p in args.prefetch.split(",") if p]
    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, max(batches))
    tables = {"shipped": model.backend.gemm_table, "all_triton": all_triton_table()}
    variants = []  # (name, table, mode, prefetch bytes)
    for tname in tables:
        variants += [(f"{tname}/off", tname, "off", 0), (f"{tname}/wait_first", tname, "wait_first", 0)]
        variants += [(f"{tname}/trigger_first", tname, "trigger_first", 0)]
        variants += [(f"{tname}/trigger_first+pf{p // 1024}k", tname, "trigger_first", p) for p in prefetches]
    rows = []
    for batch in batches:
        ids, pos, meta = decode_inputs(batch, 1024)

        def step():
            return model.compute_logits(model.forward(ids, pos, meta, state))

        times: dict[str, list[float]] = {v[0]: [] for v in variants}
        for _ in range(args.rounds):
            for name, tname, mode, pf in variants:
                with pdl_set(mode, pf):
                    times[name].append(graph_ms_with(model, step, gemm_table=tables[tname]))
        floor_ms = decode_floor_s(batch, 1024) * 1e3
        base = statistics.median(times[variants[0][0]])
        for name, ms in times.items():
            med = statistics.median(ms)
            rows.append(
                {"batch": batch, "variant": name, "ms": ms, "median_ms": med, "ratio": med / floor_ms}
            )
            print(
                f"b{batch} {name:40s} {med:.3f} ms ({med / floor_ms:.3f}, {100 * (med / base - 1):+.1f}%)",
                flush=True,
            )
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ab_pdl.json").write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
