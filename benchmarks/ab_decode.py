# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""A/B of decode-path switches of the Triton backend, on one GPU in one process: the gates computed
inside the delta-rule kernel (`gates_in_delta_rule`), the tuned decode GEMM table (`gemm_table`) and
programmatic dependent launch of the Triton kernels (`pdl`, triton_kernels/pdl.py). Graph-captured
steps at context 1K for every on/off combination of the chosen switches, in rounds (every
combination once per round, three rounds), median per combination.

    python benchmarks/ab_decode.py --out DIR [--batches 1,8,64,128] [--switches gates,table,pdl]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch
from bench_gpu import build_model, decode_floor_s, decode_inputs, load_cfg, random_state
from profile_decode import graph_ms_with

from model.backends.gemm_table import DecodeGemmTable
from model.backends.triton_kernels import pdl

SWITCHES = ("gates", "table", "pdl")


def backend_attrs(on: dict[str, bool]) -> dict:
    """Backend attributes that turn switches off (an absent key keeps the backend's own choice)."""
    attrs: dict = {}
    if not on.get("gates", True):
        attrs["gates_in_delta_rule"] = lambda meta: False
    if not on.get("table", True):
        attrs["gemm_table"] = DecodeGemmTable([])
    return attrs


@contextmanager
def pdl_set(enabled: bool):
    saved, pdl.ENABLED = pdl.ENABLED, enabled
    try:
        yield
    finally:
        pdl.ENABLED = saved


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,8,64,128")
    ap.add_argument("--switches", default="gates,table")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    names = args.switches.split(",")
    if not set(names) <= set(SWITCHES):
        raise SystemExit(f"--switches: choose from {SWITCHES}")
    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, max(batches))
    combos = list(itertools.product((False, True), repeat=len(names)))
    rows = []
    for batch in batches:
        ids, pos, meta = decode_inputs(batch, 1024)

        def step():
            return model.compute_logits(model.forward(ids, pos, meta, state))

        times: dict[tuple[bool, ...], list[float]] = {c: [] for c in combos}
        for _ in range(3):
            for c in combos:
                on = dict(zip(names, c, strict=True))
                with pdl_set(on.get("pdl", pdl.ENABLED)):
                    times[c].append(graph_ms_with(model, step, **backend_attrs(on)))
        floor_ms = decode_floor_s(batch, 1024) * 1e3
        for c, ms in times.items():
            med = statistics.median(ms)
            row = {"batch": batch, **dict(zip(names, c, strict=True)), "ms": ms, "median_ms": med}
            row["ratio"] = med / floor_ms
            rows.append(row)
            flags = " ".join(f"{n}={v}" for n, v in zip(names, c, strict=True))
            print(f"b{batch} {flags}: {med:.3f} ms ({row['ratio']:.3f})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_decode.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
