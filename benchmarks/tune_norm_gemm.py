# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Tune the residual-add RMSNorm folded into the decode GEMV after it (`triton_kernels/norm_gemm.py`)
against the two launches the decode step runs without it (the fused norm, then the product's own
path: the table's Triton GEMM or cuBLAS), for the two products that follow a block norm at the 4B
shape: the MLP's gate|up with its silu_mul epilogue (36 per step) and the GDN input projection (27).
Each candidate and the baseline run as graph replays over 256 MB or more of weight copies (nothing
read from L2), the block output as an output projection's two split-K partials.

Writes `norm_gemm_entries.json`: decode GEMM table entries ("norm_silu_mul" / "norm_linear"), a
config where the fold measured at least 3% faster, null where it did not, with both timings. Merge
them into the table for a whole-step A/B: `ab_decode.py --switches normgemm --norm-table PATH`.

    python benchmarks/tune_norm_gemm.py --out DIR [--batches 1,2,4,8,16]      (GPU)
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
MIN_GAIN = 0.03  # a config must beat the two launches by this much to enter the table


def products() -> list[tuple[str, str, int, int]]:
    """(name, table op, N, K) of the products after a block norm at the release shape."""
    t = load_cfg().text
    h = t.hidden_size
    gdn_in = 2 * t.num_linear_heads * (t.linear_head_dim + t.linear_value_dim) + 2 * t.num_linear_heads
    return [
        ("mlp_gate_up", "norm_silu_mul", 2 * t.intermediate_size, h),
        ("gdn_in", "norm_linear", gdn_in, h),
    ]


def balanced_programs(tiles: int, sms: int = 132) -> list[int]:
    """Program counts that give every persistent program the same number of tiles (to one), from one
    to two programs per SM (the tuned decode GEMM table's counts are of this kind: 115 programs for
    344 tiles)."""
    counts = {-(-tiles // r) for r in range(max(1, -(-tiles // (2 * sms))), -(-tiles // sms) + 1)}
    return sorted(c for c in counts if c <= 2 * sms)


def block_inputs(m: int, k: int, splits: int = 2, seed: int = 0):
    """An output projection's split-K partials, the residual stream and a norm weight."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = SplitKPartials((torch.randn(splits, m, k, generator=g) * 0.5).cuda(), BF16)
    residual = torch.randn(m, k, generator=g).to(BF16).cuda()
    norm_w = (1.0 + 0.1 * torch.randn(k, generator=g)).to(BF16).cuda()
    return x, residual, norm_w


@torch.inference_mode()
def tune(batches: list[int], out: Path) -> None:
    pdl.ENABLED = pdl.supported()
    backend = TritonBackend("cuda")
    backend.gemm_table = backend.gemm_table.without("norm_linear").without("norm_silu_mul")
    entries = []
    for name, op, n, k in products():
        silu = op == "norm_silu_mul"
        copies = max(2, -(-ROTATE_BYTES // (n * k * 2)))
        ws = [(torch.randn(n, k, device="cuda") * k**-0.5).to(BF16) for _ in range(copies)]
        for m in batches:
            x, res, nw = block_inputs(m, k)
            base = min(
                graph_time([lambda w=w: backend.norm_linear(x, res, nw, 1e-6, w, silu) for w in ws])
                for _ in range(2)
            )
            y_ref, s_ref = backend.norm_linear(x, res, nw, 1e-6, ws[0], silu)
            best, best_s = None, None
            configs = [
                {"block_n": bn, "block_k": 128, "num_stages": stages, "num_programs": progs}
                for bn, stages in itertools.product((16, 32, 64), (4, 5))
                for progs in balanced_programs(-(-(n // 2 if silu else n) // bn))
            ]
            for c in configs:
                try:
                    y, s = norm_gemm(x, res, nw, ws[0], 1e-6, silu, **c)
                    err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
                    if not torch.equal(s, s_ref) or err > 1e-2:
                        print(f"  {name} M={m} {c}: wrong result (rel err {err:.1e})", flush=True)
                        continue
                    t = graph_time([lambda w=w: norm_gemm(x, res, nw, w, 1e-6, silu, **c) for w in ws])
                except Exception as e:  # a config the compiler rejects
                    print(f"  {name} M={m} {c}: {type(e).__name__}", flush=True)
                    continue
                if best_s is None or t < best_s:
                    best, best_s = c, t
            wins = best_s is not None and best_s < base * (1 - MIN_GAIN)
            entries.append(
                {
                    "op": op,
                    "name": name,
                    "N": n,
                    "K": k,
                    "bias": False,
                    "max_m": m,
                    "config": best if wins else None,
                    "two_launches_us": round(base * 1e6, 2),
                    "folded_us": None if best_s is None else round(best_s * 1e6, 2),
                    "folded_config": best,
                }
            )
            print(
                f"{name} M={m}: norm + GEMM {base * 1e6:.2f} us, folded {entries[-1]['folded_us']} us {best}"
            )
        ws = None
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "norm_gemm_entries.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "entries": entries}, indent=1)
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,2,4,8,16")
    args = ap.parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("tuning needs a GPU")
    batches = [int(b) for b in args.batches.split(",")]
    if max(batches) > NORM_GEMM_MAX_M:
        raise SystemExit(f"--batches: at most {NORM_GEMM_MAX_M} rows")
    tune(batches, Path(args.out))


if __name__ == "__main__":
    main()
