# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Launch-parameter sweep of the two Triton prefill kernels at the real 4B shape (one 8K chunk at
context 8K, the steady state of a long prompt): the sliding-window attention (query block, key block,
warps, stages) and the short conv (tokens x channels per program). Prints times and TFLOP/s or TB/s
and writes `sweep_prefill_kernels.json` into --out; the best settings go into
`model/backends/triton_backend.py` (SWA_BLOCK_M, SWA_PREFILL_LAUNCH, CONV_PREFILL_LAUNCH).

    python benchmarks/sweep_prefill_kernels.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from bench_gpu import DEV, cuda_time, load_cfg

from model.backends.triton_backend import _prefill_tables
from model.backends.triton_kernels.conv import conv_prefill
from model.backends.triton_kernels.swa import swa_prefill
from model.batch import BatchMeta

BF16 = torch.bfloat16


def sweep_swa(chunk: int, ctx: int) -> list[dict]:
    cfg = load_cfg().text
    hq, hkv, d, w = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window
    q = torch.randn(chunk, hq, d, dtype=BF16, device=DEV)
    k = torch.randn(chunk, hkv, d, dtype=BF16, device=DEV)
    v = torch.randn(chunk, hkv, d, dtype=BF16, device=DEV)
    kc = torch.randn(2, w, hkv, d, dtype=BF16, device=DEV)
    vc = torch.randn(2, w, hkv, d, dtype=BF16, device=DEV)
    meta = BatchMeta.build([0], [chunk], [ctx], DEV)
    # attended pairs: each query sees min(W, its absolute index + 1) keys
    pairs = sum(min(w, ctx + i + 1) for i in range(chunk))
    flops = 4 * pairs * hq * d
    rows = []
    for bm, bn, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
        if bm == 128 and bn == 128 and stages == 3:
            continue  # shared memory
        t = _prefill_tables(meta, w, DEV, block_m=bm)
        try:
            sec = cuda_time(
                lambda: swa_prefill(
                    q,
                    k,
                    v,
                    kc,
                    vc,
                    t["blk_seq"],
                    t["blk_start"],
                    meta.cu_seqlens,
                    meta.slot_ids,
                    meta.context_lens,
                    d**-0.5,
                    bm,
                    block_n=bn,
                    num_warps=warps,
                    num_stages=stages,
                ),  # fmt: skip
                reps=5,
            )
        except Exception as e:  # a config the compiler rejects: record and go on
            rows.append(
                {"block_m": bm, "block_n": bn, "warps": warps, "stages": stages, "error": repr(e)[:200]}
            )
            continue
        row = {"block_m": bm, "block_n": bn, "warps": warps, "stages": stages, "ms": sec * 1e3}
        row["tflops"] = flops / sec / 1e12
        rows.append(row)
        print(f"swa {row}", flush=True)
    return rows


def sweep_conv(chunk: int, ctx: int) -> list[dict]:
    """The conv as the model calls it: a column slice of the fused projection in, q|k|v parts out,
    q and k L2-normalised per head in the epilogue."""
    cfg = load_cfg().text
    c, kk = cfg.conv_dim, cfg.conv_size
    key_dim = cfg.num_linear_heads * cfg.linear_head_dim
    sizes = [key_dim, key_dim, c - 2 * key_dim]
    proj = torch.randn(chunk, c + 4128, dtype=BF16, device=DEV)  # the stream's row stride in the model
    x = proj[:, :c]
    weight = torch.randn(c, kk, dtype=BF16, device=DEV)
    state = torch.randn(2, c, kk, dtype=BF16, device=DEV)
    meta = BatchMeta.build([0], [chunk], [ctx], DEV)
    t = _prefill_tables(meta, None, DEV)
    rows = []
    for bt, bc, warps in itertools.product((16, 32, 64, 128), (128, 256, 512), (4, 8)):
        if bt * bc > 32768 or (bt * bc >= 16384 and warps == 4):
            continue  # registers
        sec = cuda_time(
            lambda: conv_prefill(
                x,
                weight,
                state,
                t["tok_seq"],
                meta.cu_seqlens,
                meta.slot_ids,
                meta.context_lens,
                block_t=bt,
                block_c=bc,
                split_sizes=sizes,
                l2norm_head_dim=cfg.linear_head_dim,
                num_warps=warps,
            ),  # fmt: skip
            reps=10,
        )
        row = {"block_t": bt, "block_c": bc, "warps": warps, "ms": sec * 1e3}
        row["TBps"] = 2 * x.numel() * 2 / sec / 1e12
        rows.append(row)
        print(f"conv {row}", flush=True)
    return rows


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--conv-only", action="store_true")
    args = ap.parse_args()
    res = {"chunk": args.chunk, "ctx": args.ctx}
    res["conv"] = sweep_conv(args.chunk, args.ctx)
    if not args.conv_only:
        res["swa"] = sweep_swa(args.chunk, args.ctx)
    for kind in [k for k in ("swa", "conv") if k in res]:
        ok = [r for r in res[kind] if "ms" in r]
        best = min(ok, key=lambda r: r["ms"])
        res[f"best_{kind}"] = best
        print(f"best {kind}: {best}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_prefill_kernels.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
