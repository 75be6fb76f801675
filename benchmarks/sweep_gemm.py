# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Decode GEMMs at the real 4B shapes: cuBLAS (F.linear, and x @ W^T stored transposed) against the
Triton skinny GEMM (benchmarks/skinny_gemm.py, a candidate not used by the model) over its launch parameters, for decode
batches M = 1, 8, 32, 64. Each timing replays a CUDA graph of 20 calls (no launch overhead). Prints
achieved TB/s on the weight bytes and the per-step total over the model's 36 layers; writes
`sweep_gemm.json` into --out.

    python benchmarks/sweep_gemm.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_gpu import DEV, load_cfg
from skinny_gemm import skinny_gemm

BF16 = torch.bfloat16
REPS = 20


def graph_time(fn) -> float:
    """Seconds per call of fn, from a CUDA graph of REPS calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * REPS)


def shapes() -> list[tuple[str, int, int, int, bool]]:
    """(name, N, K, calls per step, bias) of every decode GEMM."""
    t = load_cfg().text
    h, kd, vd = t.hidden_size, t.num_linear_heads * t.linear_head_dim, t.num_linear_heads * t.linear_value_dim
    qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    ngdn, nswa = len(t.gdn_layers), len(t.swa_layers)
    return [
        ("mlp_gate_up", 2 * t.intermediate_size, h, ngdn + nswa, False),
        ("mlp_down", h, t.intermediate_size, ngdn + nswa, False),
        ("gdn_in", 2 * kd + 2 * vd + 2 * t.num_linear_heads, h, ngdn, False),
        ("gdn_out", h, vd, ngdn, False),
        ("swa_qkv", qkv, h, nswa, True),
        ("swa_out", h, t.num_attention_heads * t.head_dim, nswa, False),
        ("lm_head", t.vocab_size, h, 1, False),
    ]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,8,32,64")
    args = ap.parse_args()
    rows = []
    for name, n, k, calls, has_bias in shapes():
        w = torch.randn(n, k, dtype=BF16, device=DEV) * 0.02
        wt = w.t().contiguous()
        b = torch.randn(n, dtype=BF16, device=DEV) if has_bias else None
        nbytes = w.numel() * 2
        for m in [int(x) for x in args.batches.split(",")]:
            x = torch.randn(m, k, dtype=BF16, device=DEV)
            ref = F.linear(x, w, b)
            row = {"gemm": name, "N": n, "K": k, "M": m, "calls": calls}
            row["cublas_us"] = graph_time(lambda: F.linear(x, w, b)) * 1e6
            row["cublas_t_us"] = graph_time(lambda: torch.addmm(b, x, wt) if b is not None else x @ wt) * 1e6
            best = None
            for bn, bk, stages, split in itertools.product((32, 64, 128), (128, 256), (3, 5), (1, 2, 4, 8)):
                if (n // bn) * split > 8 * 132 or (split > 1 and (n // bn) >= 2 * 132):
                    continue  # enough programs without (more) split-K
                cfg = {"block_n": bn, "block_k": bk, "num_stages": stages, "split_k": split}
                try:
                    out = skinny_gemm(x, w, b, **cfg)
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    if not err < 2e-2:
                        continue
                    us = graph_time(lambda: skinny_gemm(x, w, b, **cfg)) * 1e6
                except Exception:  # a config the compiler rejects (shared memory): skip
                    continue
                if best is None or us < best["us"]:
                    best = {**cfg, "us": us}
            row["triton_best"] = best
            for key in ("cublas_us", "cublas_t_us"):
                row[key.replace("_us", "_TBps")] = nbytes / (row[key] * 1e-6) / 1e12
            if best:
                row["triton_TBps"] = nbytes / (best["us"] * 1e-6) / 1e12
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for m in sorted({r["M"] for r in rows}):
        sel = [r for r in rows if r["M"] == m]
        summary[m] = {
            "cublas_ms": sum(r["cublas_us"] * r["calls"] for r in sel) / 1e3,
            "cublas_t_ms": sum(r["cublas_t_us"] * r["calls"] for r in sel) / 1e3,
            "best_of_each_ms": sum(
                min(r["cublas_us"], r["triton_best"]["us"] if r["triton_best"] else 1e9) * r["calls"]
                for r in sel
            )
            / 1e3,
        }
        print(f"M={m}: per-step GEMM time {summary[m]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_gemm.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
