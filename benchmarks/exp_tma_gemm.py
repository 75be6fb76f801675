# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Experiment: the decode GEMM with TMA tile loads (`decode_gemm(..., tma=True)`, optionally with
Triton's warp specialization) against the pointer-load kernel and cuBLAS, per decode projection of
the 4B shape at a few batch sizes. The pointer kernel runs the table's best config
(`triton_config` of model/backends/decode_gemm_sm90.json); the TMA kernel runs that config and a small
sweep around it. Timing as tune_decode_gemm.py (CUDA graph cycling through 256 MB of weight copies).

    python benchmarks/exp_tma_gemm.py --out DIR [--ms 1,16,64,128] [--shapes all]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from sweep_gemm import graph_time, shapes
from tune_decode_gemm import BF16, DEV, search, weight_copies

from model.backends.gemm_table import TABLE_SM90
from model.backends.triton_kernels.gemm import decode_gemm


def table_config(name: str, m: int, op: str = "linear") -> dict | None:
    """The tuner's best pointer-kernel config for the smallest bucket >= m."""
    entries = json.loads(TABLE_SM90.read_text())["entries"]
    rows = sorted(
        (e for e in entries if e["name"] == name and e.get("op", "linear") == op and e["max_m"] >= m),
        key=lambda e: e["max_m"],
    )
    return dict(rows[0]["triton_config"]) if rows and rows[0].get("triton_config") else None


def tma_configs(base: dict, m: int) -> list[dict]:
    out = []
    for bn, bk, stages, ws in itertools.product((32, 64, 128), (128,), (3, 5), (False, True)):
        cfg = dict(base) | {"block_n": bn, "block_k": bk, "num_stages": stages, "tma": True}
        cfg.pop("num_programs", None)
        cfg["warp_specialize"] = ws
        out.append(cfg)
    return out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ms", default="1,16,64,128")
    ap.add_argument("--shapes", default="all")
    args = ap.parse_args()
    ms = [int(x) for x in args.ms.split(",")]
    rows = []
    for name, n, k, calls, has_bias in shapes():
        if args.shapes != "all" and name not in args.shapes.split(","):
            continue
        ws = weight_copies(n, k)
        b = torch.randn(n, dtype=BF16, device=DEV) if has_bias else None
        ops = ["linear", "silu_mul"] if name == "mlp_gate_up" else ["linear"]
        for m, op in itertools.product(ms, ops):
            x = torch.randn(m, k, dtype=BF16, device=DEV)
            silu = op == "silu_mul"
            if silu:
                gu = F.linear(x, ws[0]).float()
                ref = F.silu(gu[:, : n // 2]) * gu[:, n // 2 :]
            else:
                ref = F.linear(x.float(), ws[0].float(), None if b is None else b.float())
            cublas = min(graph_time([lambda w=w: F.linear(x, w, b) for w in ws]) for _ in range(2))
            base = table_config(name, m, op) or {
                "block_n": 64,
                "block_k": 128,
                "num_stages": 4,
                "num_warps": 4,
            }

            def run(w, cfg):
                return decode_gemm(x, w, b, silu_mul=silu, **cfg)

            _, ptr_s = search(f"{name} M={m} ptr", [base], run, ws, ref)
            same = dict(base) | {"tma": True}
            _, same_s = search(f"{name} M={m} tma same", [same], run, ws, ref)
            best, best_s = search(f"{name} M={m} {op} tma", tma_configs(base, m), run, ws, ref)
            row = {
                "name": name, "op": op, "m": m, "N": n, "K": k, "calls_per_step": calls,
                "cublas_us": cublas * 1e6, "pointer_us": ptr_s and ptr_s * 1e6, "pointer_config": base,
                "tma_same_us": same_s and same_s * 1e6, "tma_best_us": best_s and best_s * 1e6,
                "tma_best_config": best, "weight_tb_s_best": best_s and n * k * 2 / best_s / 1e12,
            }  # fmt: skip
            rows.append(row)
            print(
                f"{name} {op} M={m}: cublas {row['cublas_us']:.1f} pointer {row['pointer_us'] or 0:.1f} "
                f"tma(same) {row['tma_same_us'] or 0:.1f} tma best {row['tma_best_us'] or 0:.1f} {best}",
                flush=True,
            )
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "exp_tma_gemm.json").write_text(json.dumps(rows, indent=1))
        ws = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
