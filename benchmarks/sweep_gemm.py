# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Decode GEMMs at the real 4B shapes, for decode batches M (default 1, 64, 128):
- cuBLAS as the model calls it (F.linear), and with cuBLASLt preferred;
- the weight stored transposed (x @ W^T through cuBLAS "NN");
- the persistent Triton GEMM (model/backends/triton_kernels/gemm.py) over its launch parameters.

Each timing replays a CUDA graph of 20 calls that cycle through enough copies of the weight (256 MB or
more) that no call finds its weight in L2, as in a decode step. Prints achieved TB/s on the weight
bytes and the per-step total over the model's 36 layers; then (--step) times whole graph-captured decode
steps with cuBLAS and with cuBLASLt preferred. Writes `sweep_gemm.json` into --out.

    python benchmarks/sweep_gemm.py --out DIR [--batches 1,64,128] [--step]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_gpu import DEV, build_model, cuda_time, decode_floor_s, load_cfg, random_state

from model.backends.triton_kernels import pdl
from model.backends.triton_kernels.gemm import decode_gemm

BF16 = torch.bfloat16
REPS = 20
ROTATE_BYTES = 256 << 20


def graph_time(fns) -> float:
    """Seconds per call, from a CUDA graph of REPS calls cycling through `fns`."""
    with pdl.warmup():  # the kernel variants the capture launches
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(REPS):
            fns[i % len(fns)]()
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


def triton_configs(m: int, n: int, has_bias: bool) -> list[dict]:
    """Launch parameters worth timing for an [m, *] x [n, *]^T product."""
    out = []
    warps = (4, 8) if m >= 64 else (4,)
    for bn, stages, nw in itertools.product((32, 64, 128, 256), (3, 5), warps):
        if m >= 128 and bn == 256:
            continue  # accumulator too large for the register file
        tiles = -(-n // bn)
        for split in (1, 2, 4, 8):
            if split > 1 and (has_bias or tiles * split > 4 * 132 or tiles >= 132):
                continue  # enough units without (more) split-K
            out.append(
                {"block_n": bn, "block_k": 128, "num_stages": stages, "num_warps": nw, "split_k": split}
            )
    return out


def set_lt(prefer: bool) -> None:
    torch.backends.cuda.preferred_blas_library("cublaslt" if prefer else "cublas")


@torch.inference_mode()
def sweep(batches: list[int]) -> dict:
    rows = []
    for name, n, k, calls, has_bias in shapes():
        nbytes = n * k * 2
        copies = max(2, -(-ROTATE_BYTES // nbytes))
        ws = [torch.randn(n, k, dtype=BF16, device=DEV) * 0.02 for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        b = torch.randn(n, dtype=BF16, device=DEV) if has_bias else None
        for m in batches:
            t0 = time.perf_counter()
            x = torch.randn(m, k, dtype=BF16, device=DEV)
            ref = F.linear(x, ws[0], b).float()
            row = {"gemm": name, "N": n, "K": k, "M": m, "calls": calls}
            row["cublas_us"] = graph_time([lambda w=w: F.linear(x, w, b) for w in ws]) * 1e6
            set_lt(True)
            row["cublaslt_us"] = graph_time([lambda w=w: F.linear(x, w, b) for w in ws]) * 1e6
            set_lt(False)
            row["transposed_us"] = (
                graph_time([lambda wt=wt: torch.addmm(b, x, wt) if b is not None else x @ wt for wt in wts])
                * 1e6
            )
            best, tried = None, 0
            for cfg in triton_configs(m, n, has_bias):
                try:
                    got = decode_gemm(x, ws[0], b, **cfg).float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        print(f"  {name} M={m} {cfg}: rel err {err:.2e}", flush=True)
                        continue
                    us = graph_time([lambda w=w: decode_gemm(x, w, b, **cfg) for w in ws]) * 1e6
                except Exception as e:  # a config the compiler rejects (shared memory): skip
                    print(f"  {name} M={m} {cfg}: {type(e).__name__}", flush=True)
                    continue
                tried += 1
                if best is None or us < best["us"]:
                    best = {**cfg, "us": us}
            if best is not None:  # the best config with more programs and without flattening
                for extra in ({"num_programs": 264}, {"flatten": False}):
                    cfg = {k2: v for k2, v in best.items() if k2 != "us"} | extra
                    try:
                        us = graph_time([lambda w=w: decode_gemm(x, w, b, **cfg) for w in ws]) * 1e6
                    except Exception:
                        continue
                    row[f"triton_{next(iter(extra))}_us"] = us
                    if us < best["us"]:
                        best = {**cfg, "us": us}
            row["triton_best"] = best
            row["triton_configs_tried"] = tried
            for key in ("cublas", "cublaslt", "transposed"):
                row[f"{key}_TBps"] = nbytes / (row[f"{key}_us"] * 1e-6) / 1e12
            if best:
                row["triton_TBps"] = nbytes / (best["us"] * 1e-6) / 1e12
            row["sweep_s"] = time.perf_counter() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
        del ws, wts
        torch.cuda.empty_cache()
    summary = {}
    for m in batches:
        sel = [r for r in rows if r["M"] == m]

        def total(key):
            return sum(r[key] * r["calls"] for r in sel) / 1e3

        summary[m] = {
            "cublas_ms": total("cublas_us"),
            "cublaslt_ms": total("cublaslt_us"),
            "transposed_ms": total("transposed_us"),
            "triton_ms": sum((r["triton_best"] or {"us": 1e9})["us"] * r["calls"] for r in sel) / 1e3,
            "best_of_cublas_triton_ms": sum(
                min(r["cublas_us"], (r["triton_best"] or {"us": 1e9})["us"]) * r["calls"] for r in sel
            )
            / 1e3,
        }
        print(f"M={m}: per-step GEMM time {summary[m]}", flush=True)
    return {"rows": rows, "summary": summary}


@torch.inference_mode()
def step_ab(batches: list[int]) -> list[dict]:
    """Graph-captured decode steps (context 1K) with cuBLAS and with cuBLASLt preferred."""
    from serving.cuda_graph import CudaGraphRunner

    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, max(batches))
    out = []
    for prefer_lt in (False, True, False):
        set_lt(prefer_lt)
        runner = CudaGraphRunner(model, state, max_batch=max(batches), device=DEV, sizes=batches)
        for batch in batches:
            ids = torch.randint(0, 150000, (batch,), device=DEV)
            pos = torch.full((3, batch), 1024, dtype=torch.int64, device=DEV)
            slots = torch.arange(batch, device=DEV)
            ctx = torch.full((batch,), 1024, dtype=torch.int64, device=DEV)
            sec = cuda_time(lambda: runner.run(ids, pos, slots, ctx), reps=30)
            row = {
                "blas": "cublaslt" if prefer_lt else "cublas",
                "batch": batch,
                "step_ms": sec * 1e3,
                "ratio": sec / decode_floor_s(batch, 1024),
            }
            out.append(row)
            print(f"step {row}", flush=True)
        runner = None
        torch.cuda.empty_cache()
    set_lt(False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,64,128")
    ap.add_argument("--step", action="store_true", help="also time whole decode steps, cuBLAS vs cuBLASLt")
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name()}
    if args.step:
        result["step"] = step_ab(batches)
        (out / "sweep_gemm.json").write_text(json.dumps(result, indent=1))
    result |= sweep(batches)
    (out / "sweep_gemm.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
