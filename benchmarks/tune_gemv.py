# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Tune the batch-1 decode GEMMs that no norm precedes (the output projections and the LM head) on
the persistent GEMM's CUDA-core path (`decode_gemm(gemv=True)`: one row in FMAs, no 16-row tensor-core
tile) against the shipped table's launch (`decode_gemm_sm90.json`, bucket 1). The output projections
leave their split-K partials to the next norm (reduce=False, as the decode step runs them); the LM
head stores fp32 logits. Graph replays over 256 MB or more of weight copies, PDL on where the GPU
has it.

Writes `gemv_entries.json`: {"table": ["linear" entries for bucket 1: the fastest gemv config where
it beat the shipped launch by MIN_GAIN, the shipped config where not]} for
`ab_decode.py --switches extra --extra-table PATH`.

    python benchmarks/tune_gemv.py --out DIR      (GPU)
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

from sweep_gemm import ROTATE_BYTES, graph_time, shapes  # noqa: E402
from tune_norm_gemm import balanced_programs  # noqa: E402

from model.backends.gemm_table import TABLE_SM90, DecodeGemmTable  # noqa: E402
from model.backends.triton_kernels import pdl  # noqa: E402
from model.backends.triton_kernels.gemm import decode_gemm  # noqa: E402

BF16 = torch.bfloat16
MIN_GAIN = 0.02
NAMES = ("mlp_down", "gdn_out", "swa_out", "lm_head")


def configs(n: int, k: int, sms: int) -> list[dict]:
    splits = (1,) if n > 16384 else (2, 4, 8)
    out = []
    for (bn, bk), st, sk in itertools.product(
        [(16, 256), (32, 256), (64, 256), (32, 512), (64, 128)], (3, 4), splits
    ):
        units = -(-n // bn) * sk
        for p in balanced_programs(units, sms):
            out.append(
                {
                    "block_n": bn,
                    "block_k": bk,
                    "num_stages": st,
                    "num_warps": 4,
                    "split_k": sk,
                    "num_programs": p,
                }
            )
    return out


@torch.inference_mode()
def tune(out: Path) -> None:
    pdl.ENABLED = pdl.supported()
    table = DecodeGemmTable.load(TABLE_SM90)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    entries, saved_us = [], 0.0
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, n, k, calls, has_bias in shapes():
        if name not in NAMES:
            continue
        shipped = table.lookup(1, n, k, has_bias)
        copies = max(2, -(-ROTATE_BYTES // (n * k * 2)))
        ws = [(torch.randn(n, k, device="cuda") * k**-0.5).to(BF16) for _ in range(copies)]
        x = torch.randn(1, k, generator=g).to(BF16).cuda()
        logits = torch.empty(1, n, device="cuda") if name == "lm_head" else None

        def launch(w, cfg):
            if logits is not None:
                return decode_gemm(x, w, out=logits, **cfg)
            return decode_gemm(x, w, reduce=False, **cfg)

        def total(y):
            return y.sum(0) if y.dim() == 3 else y.float()

        base = min(graph_time([lambda w=w: launch(w, shipped) for w in ws]) for _ in range(2))
        ref = total(launch(ws[0], shipped)).clone()
        results = []
        for c in configs(n, k, sms):
            cfg = {**c, "gemv": True}
            try:
                with pdl.warmup():
                    err = ((total(launch(ws[0], cfg)) - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    print(f"  {name} {c}: wrong result (rel err {err:.1e})", flush=True)
                    continue
                t = graph_time([lambda w=w: launch(w, cfg) for w in ws])
            except Exception as e:  # a config the compiler rejects
                print(f"  {name} {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            results.append((t, cfg))
        results.sort(key=lambda r: r[0])
        best_s, best = results[0] if results else (None, None)
        wins = best_s is not None and best_s < base * (1 - MIN_GAIN)
        if wins:
            saved_us += calls * (base - best_s) * 1e6
        entries.append(
            {
                "op": "linear",
                "name": name,
                "N": n,
                "K": k,
                "bias": has_bias,
                "max_m": 1,
                "config": best if wins else shipped,
                "shipped_us": round(base * 1e6, 2),
                "gemv_us": None if best_s is None else round(best_s * 1e6, 2),
                "gemv_config": best,
                "next_best": [(round(t * 1e6, 2), c) for t, c in results[1:4]],
            }
        )
        print(f"{name} M=1: shipped {base * 1e6:.2f} us {shipped}, gemv {entries[-1]['gemv_us']} us {best}")
        ws = None
        torch.cuda.empty_cache()
    print(f"M=1: the winning gemv configs would save {saved_us:.1f} us per decode step (isolated timings)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_entries.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "table": entries}, indent=1)
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("tuning needs a GPU")
    tune(Path(args.out))


if __name__ == "__main__":
    main()
