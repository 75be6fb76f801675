# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Launch sweep of the decode delta-rule kernel (triton_kernels/gdn.py) at the real GDN shape (16 heads,
d_k 128, d_v 256, fp32 state in a pool), next to an in-place read+write of the same state bytes (the
bandwidth the kernel can approach). Every variant's output and state are compared with the default
launch's (max abs difference). Times are CUDA-graph replays of 20 calls (no launch gaps), per call.

    python benchmarks/sweep_gdn_decode.py --out DIR [--batches 1,8,64,128,256]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from model.backends.triton_kernels import pdl
from model.backends.triton_kernels.gdn import gdn_decode

H, DK, DV = 16, 128, 256
CALLS = 20


def graph_us(fn) -> float:
    """Per-call µs of `fn` replayed CALLS times inside one CUDA graph (median of 5 replays)."""
    with pdl.warmup():  # the kernel variants the capture launches
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return sorted(times)[2]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,8,64,128,256")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        g = torch.Generator(dev).manual_seed(b)
        pool = torch.randn(b + 1, H, DK, DV, generator=g, device=dev)
        slots = torch.randperm(b + 1, generator=g, device=dev)[:b]
        ctx = torch.full((b,), 100, dtype=torch.int32, device=dev)
        q, k = (torch.randn(b, H, DK, generator=g, device=dev).bfloat16() for _ in range(2))
        v = torch.randn(b, H, DV, generator=g, device=dev).bfloat16()
        a, bb = (torch.randn(b, H, generator=g, device=dev).bfloat16() for _ in range(2))
        nea = -torch.rand(H, generator=g, device=dev)
        dtb = torch.randn(H, generator=g, device=dev)

        def call(launch, state):
            return gdn_decode(q, k, v, a, bb, state, slots, ctx, DK**-0.5, False, nea, dtb, launch)

        ref_state = pool.clone()
        ref_out = call(None, ref_state)
        state_bytes = 2 * b * H * DK * DV * 4  # read + write
        live = pool[: b + 1]
        copy_us = graph_us(lambda: live.mul_(1.0))  # in-place read + write of the same bytes (+1 row)
        copy_bw = 2 * live.numel() * 4 / copy_us / 1e6
        print(f"b{b}: in-place mul_ of the state {copy_us:.1f} us ({copy_bw:.2f} TB/s)", flush=True)
        rows.append({"batch": b, "variant": "inplace_mul", "us": copy_us, "tb_s": copy_bw})
        for bv, warps in itertools.product((16, 32, 64, 128), (1, 2, 4, 8)):
            launch = {"bv": bv, "num_warps": warps}
            state = pool.clone()
            try:
                out = call(launch, state)
                err = max(
                    (out.float() - ref_out.float()).abs().max().item(), (state - ref_state).abs().max().item()
                )
                us = graph_us(lambda: call(launch, state))
            except Exception as e:  # a launch that does not compile (registers) is reported, not fatal
                print(f"b{b} {launch}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            bw = state_bytes / us / 1e6
            rows.append({"batch": b, **launch, "us": us, "tb_s": bw, "max_abs_diff": err})
            print(
                f"b{b} bv{bv} w{warps}: {us:.1f} us ({bw:.2f} TB/s) diff {err:.1e}",
                flush=True,
            )
        best = min((r for r in rows if r["batch"] == b and "bv" in r), key=lambda r: r["us"])
        print(f"b{b} best: {best}", flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "sweep_gdn_decode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
