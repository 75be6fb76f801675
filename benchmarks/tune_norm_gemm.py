# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Tune the residual-add RMSNorm folded into the decode GEMV after it (`triton_kernels/norm_gemm.py`,
the norm's scale applied in the epilogue) against the two launches the decode step runs without it
(the fused norm, then the product's own path: the table's Triton GEMM or cuBLAS), for the three
products that follow a block norm at the 4B shape: the MLP's gate|up with silu_mul (36 per step),
the GDN input projection (27) and the SWA q|k|v projection with its bias (9). Every candidate and
the baseline run as graph replays (PDL on where the GPU has it) over 256 MB or more of weight copies,
the block output as an output projection's four split-K partials (as the decode step's output
projections leave them at batch 1).

Writes `norm_gemm_entries.json`: {"table": [decode GEMM table entries ("norm_silu_mul" /
"norm_linear"): a config where the fold measured at least MIN_GAIN faster, null where not, with both
timings]} for `ab_decode.py --switches extra --extra-table PATH`.

    python benchmarks/tune_norm_gemm.py --out DIR [--batches 1,8]      (GPU)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import load_cfg  # noqa: E402
from sweep_gemm import ROTATE_BYTES, graph_time  # noqa: E402

from model.backends.base import SplitKPartials  # noqa: E402
from model.backends.triton_backend import TritonBackend  # noqa: E402
from model.backends.triton_kernels import pdl  # noqa: E402
from model.backends.triton_kernels.norm_gemm import NORM_GEMM_MAX_M, norm_gemm  # noqa: E402

BF16 = torch.bfloat16
MIN_GAIN = 0.02  # a config must beat the two launches by this much to enter the table
SPLITS = 4  # the batch-1 output projections' split-K (decode_gemm_sm90.json)


def products() -> list[tuple[str, str, int, int, bool, int]]:
    """(name, table op, N, K, bias, calls per step) of the products after a block norm."""
    t = load_cfg().text
    h = t.hidden_size
    gdn_in = 2 * t.num_linear_heads * (t.linear_head_dim + t.linear_value_dim) + 2 * t.num_linear_heads
    qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    ngdn, nswa = len(t.gdn_layers), len(t.swa_layers)
    return [
        ("mlp_gate_up", "norm_silu_mul", 2 * t.intermediate_size, h, False, ngdn + nswa),
        ("gdn_in", "norm_linear", gdn_in, h, False, ngdn),
        ("swa_qkv", "norm_linear", qkv, h, True, nswa),
    ]


def balanced_programs(tiles: int, sms: int) -> list[int]:
    """Program counts that give every persistent program the same number of row tiles (to one): the
    two largest up to one program per SM, and the largest up to two per SM."""
    counts = {-(-tiles // r) for r in range(1, -(-tiles // sms) + 3)}
    one = sorted((c for c in counts if c <= sms), reverse=True)[:2]
    two = [c for c in sorted(counts, reverse=True) if sms < c <= 2 * sms][:1]
    return one + two


def configs(m: int, n_out: int, sms: int) -> list[dict]:
    if m == 1:  # CUDA-core GEMV: [BLOCK_N, BLOCK_K] fp32 partial products per program
        shapes = [(16, 256), (32, 256), (64, 256), (16, 512), (32, 512), (32, 128)]
        grid = itertools.product(shapes, (2, 3, 4), (4,))
    else:  # tensor-core tiles of BLOCK_M rows
        grid = itertools.product([(32, 128), (64, 128)], (4, 5), (4,))
    return [
        {"block_n": bn, "block_k": bk, "num_stages": st, "num_warps": nw, "num_programs": p}
        for (bn, bk), st, nw in grid
        for p in balanced_programs(-(-n_out // bn), sms)
    ]


def block_inputs(m: int, k: int, seed: int = 0):
    """An output projection's split-K partials, the residual stream and a norm weight."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = SplitKPartials((torch.randn(SPLITS, m, k, generator=g) * 0.25).cuda(), BF16)
    residual = torch.randn(m, k, generator=g).to(BF16).cuda()
    norm_w = (1.0 + 0.1 * torch.randn(k, generator=g)).to(BF16).cuda()
    return x, residual, norm_w


@torch.inference_mode()
def tune(batches: list[int], out: Path) -> None:
    pdl.ENABLED = pdl.supported()
    backend = TritonBackend("cuda")
    backend.gemm_table = backend.gemm_table.without("norm_linear").without("norm_silu_mul")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    entries, saved_us = [], {m: 0.0 for m in batches}
    for name, op, n, k, has_bias, calls in products():
        silu = op == "norm_silu_mul"
        n_out = n // 2 if silu else n
        copies = max(2, -(-ROTATE_BYTES // (n * k * 2)))
        ws = [(torch.randn(n, k, device="cuda") * k**-0.5).to(BF16) for _ in range(copies)]
        bias = torch.randn(n, device="cuda").to(BF16) if has_bias else None
        for m in batches:
            x, res, nw = block_inputs(m, k)
            base = min(
                graph_time([lambda w=w: backend.norm_linear(x, res, nw, 1e-6, w, bias, silu) for w in ws])
                for _ in range(2)
            )
            y_ref, s_ref = backend.norm_linear(x, res, nw, 1e-6, ws[0], bias, silu)
            results = []
            for c in configs(m, n_out, sms):
                try:
                    with pdl.warmup():  # compiles the variant the capture launches, once
                        y, s = norm_gemm(x, res, nw, 1e-6, ws[0], bias, silu, **c)
                    err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
                    if not torch.equal(s, s_ref) or not err < 1e-2:
                        print(f"  {name} M={m} {c}: wrong result (rel err {err:.1e})", flush=True)
                        continue
                    t = graph_time([lambda w=w: norm_gemm(x, res, nw, 1e-6, w, bias, silu, **c) for w in ws])
                except Exception as e:  # a config the compiler rejects (registers, shared memory)
                    print(f"  {name} M={m} {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                results.append((t, c, err))
            results.sort(key=lambda r: r[0])
            best_s, best, err = results[0] if results else (None, None, None)
            wins = best_s is not None and best_s < base * (1 - MIN_GAIN)
            if wins:
                saved_us[m] += calls * (base - best_s) * 1e6
            entries.append(
                {
                    "op": op,
                    "name": name,
                    "N": n,
                    "K": k,
                    "bias": has_bias,
                    "max_m": m,
                    "config": best if wins else None,
                    "two_launches_us": round(base * 1e6, 2),
                    "folded_us": None if best_s is None else round(best_s * 1e6, 2),
                    "folded_config": best,
                    "rel_err": err,
                    "next_best": [(round(t * 1e6, 2), c) for t, c, _ in results[1:4]],
                }
            )
            print(
                f"{name} M={m}: norm + GEMM {base * 1e6:.2f} us, folded {entries[-1]['folded_us']} us {best}"
            )
        ws = None
        torch.cuda.empty_cache()
    for m, us in saved_us.items():
        print(f"M={m}: the winning folds would save {us:.1f} us per decode step (isolated timings)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "norm_gemm_entries.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "table": entries}, indent=1)
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1")
    args = ap.parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("tuning needs a GPU")
    batches = [int(b) for b in args.batches.split(",")]
    if max(batches) > NORM_GEMM_MAX_M:
        raise SystemExit(f"--batches: at most {NORM_GEMM_MAX_M} rows")
    tune(batches, Path(args.out))


if __name__ == "__main__":
    main()
