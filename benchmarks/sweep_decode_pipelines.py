# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Deeper software pipelines for the decode GEMMs at small batch: more weight bytes in flight per SM.

tune_decode_gemm.py searched 3 to 5 stages of 128-column K blocks. At batch 1 a program holds about
80 KB of weight loads in flight with the shipped configs, and the fused MLP sweep (bench results of
eafec86) showed the GEMV slowing sharply when that halves. This sweep starts from each shape's shipped
config at batch M (the table's Triton config, or the best Triton config it recorded where cuBLAS won)
and times 5 to 10 stages, K blocks of 128 and 256 and the row tile doubled, against the backend's own
path for that shape (output projections with the residual-add norm that consumes their partial
sums, as tune_decode_gemm.py times them). Entries that beat the shipped path by 2% or more are
written as a table that ab_decode.py --switches extra --extra-table takes.

    python benchmarks/sweep_decode_pipelines.py --out DIR [--batches 1] [--shapes all]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_gpu import DEV
from sweep_gemm import graph_time, shapes
from tune_decode_gemm import OUTPUT_PROJECTIONS, norm_after, program_counts, search, weight_copies

from model.backends.gemm_table import TABLE_SM90
from model.backends.triton_kernels.gemm import decode_gemm

BF16 = torch.bfloat16
MARGIN = 0.98
SMEM_LIMIT = 220 * 1024


def shipped(name: str, m: int, op: str) -> tuple[dict | None, dict | None]:
    """(the table's config, the best Triton config it recorded) for a shape at batch m."""
    entries = json.loads(TABLE_SM90.read_text())["entries"]
    rows = sorted(
        (e for e in entries if e.get("name") == name and e.get("op", "linear") == op and e["max_m"] >= m),
        key=lambda e: e["max_m"],
    )  # fmt: skip
    if not rows:
        return None, None
    return rows[0].get("config"), rows[0].get("triton_config") or rows[0].get("config")


def variants(start: dict, n_units: int, silu: bool, m: int) -> list[dict]:
    """The start config with deeper pipelines, wider K blocks and a doubled row tile."""
    out = []
    for bn in (start["block_n"], 2 * start["block_n"]):
        for bk in (128, 256):
            for stages in (5, 6, 8, 10):
                stage_bytes = (max(16, m) * bk + bn * bk * (2 if silu else 1)) * 2
                if stages * stage_bytes > SMEM_LIMIT:
                    continue
                split = start.get("split_k", 1)
                units = -(-n_units // bn) * split
                for progs in program_counts(units):  # one per SM, and the balanced count
                    cfg = dict(start) | {"block_n": bn, "block_k": bk, "num_stages": stages}
                    cfg["num_programs"] = progs
                    out.append(cfg)
    return out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--shapes", default="all")
    args = ap.parse_args()
    rows, table = [], []
    for name, n, k, calls, has_bias in shapes():
        if args.shapes != "all" and name not in args.shapes.split(","):
            continue
        ws = weight_copies(n, k)
        b = torch.randn(n, dtype=BF16, device=DEV) if has_bias else None
        for m in [int(x) for x in args.batches.split(",")]:
            x = torch.randn(m, k, dtype=BF16, device=DEV)
            silu = name == "mlp_gate_up"
            op = "silu_mul" if silu else "linear"
            cfg, start = shipped(name, m, op)
            if start is None:
                print(f"{name} M={m}: no Triton config recorded", flush=True)
                continue
            reduce = name not in OUTPUT_PROJECTIONS
            then = norm_after(m, n) if name in OUTPUT_PROJECTIONS else (lambda y: y)
            if silu:
                gate, up = F.linear(x.float(), ws[0].float()).to(BF16).chunk(2, dim=-1)
                ref = (F.silu(gate) * up).float()
                run = lambda w, c: decode_gemm(x, w, None, silu_mul=True, **c)  # noqa: E731
                units = n // 2
            else:
                ref = F.linear(x.float(), ws[0].float(), None if b is None else b.float())
                run = lambda w, c: decode_gemm(x, w, b, reduce=reduce, **c)  # noqa: E731
                units = n
            t0 = time.perf_counter()
            if cfg is None:  # cuBLAS ships
                base_s = min(graph_time([lambda w=w: then(F.linear(x, w, b)) for w in ws]) for _ in range(2))
            else:
                base_s = min(graph_time([lambda w=w: then(run(w, cfg)) for w in ws]) for _ in range(2))
            best, best_s = search(f"{name} M={m}", variants(start, units, silu, m), run, ws, ref, then)
            win = best is not None and best_s < MARGIN * base_s
            row = {
                "name": name, "op": op, "N": n, "K": k, "bias": has_bias, "max_m": m, "calls_per_step": calls,
                "shipped": cfg, "shipped_us": round(base_s * 1e6, 2), "best": best,
                "best_us": None if best_s is None else round(best_s * 1e6, 2), "win": win,
            }  # fmt: skip
            rows.append(row)
            if win:
                table.append({"op": op, "N": n, "K": k, "bias": has_bias, "max_m": m, "config": best})
            saved = (base_s - best_s) * calls * 1e6 if best_s is not None else 0.0
            print(
                f"{name} M={m}: shipped {row['shipped_us']} us, best {row['best_us']} us {best} "
                f"({'win' if win else 'no win'}, {saved:+.1f} us per step; {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        ws = None
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"device": torch.cuda.get_device_name(), "rows": rows, "table": table}
    (out / "sweep_decode_pipelines.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
