# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Experiment: language-model GEMM weights stored transposed ([in, out] contiguous, used through a
`.t()` view) against the checkpoint's [out, in] layout. cuBLAS then runs the "NN" kernels, which the
GEMM sweep found faster for decode shapes. Times graph decode steps and one 8K prefill chunk both ways.

    python benchmarks/exp_transposed_weights.py --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_gpu import (
    build_model,
    chunk_inputs,
    cuda_time,
    decode_floor_s,
    decode_inputs,
    load_cfg,
    random_state,
)
from profile_decode import graph_ms_with


def weight_slots(model, gate_up: bool = True) -> list[tuple[torch.nn.Module, str]]:
    """(module, attribute) of every GEMM weight the decoder's forward reads (without the MLP's
    gate|up when `gate_up` is False)."""
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fused = "in_proj_weight" if hasattr(attn, "in_proj_weight") else "qkv_weight"
        out += [(attn, fused), (attn.o_proj, "weight"), (mlp.down_proj, "weight")]
        if gate_up:
            out.append((mlp, "gate_up_weight"))
    return out


@torch.no_grad()
def set_layout(model, transposed: bool, saved: dict, gate_up: bool = True) -> None:
    """Every `weight_slots` weight stored [in, out] and read through a `.t()` view (transposed), or
    back to the original tensors kept in `saved`."""
    for mod, attr in weight_slots(model, gate_up):
        key = (id(mod), attr)
        if key not in saved:
            saved[key] = getattr(mod, attr)
        w = saved[key]
        new = w.t().contiguous().t() if transposed else w
        if isinstance(w, torch.nn.Parameter):
            setattr(mod, attr, torch.nn.Parameter(new, requires_grad=False))
        else:
            setattr(mod, attr, new)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,64,128")
    args = ap.parse_args()
    cfg = load_cfg()
    model = build_model(cfg)
    batches = [int(b) for b in args.batches.split(",")]
    state = random_state(cfg, max(batches))
    saved: dict = {}
    res: dict = {"decode": [], "prefill": {}}
    for transposed in (False, True, False):
        set_layout(model, transposed, saved)
        torch.cuda.empty_cache()
        for batch in batches:
            ids, pos, meta = decode_inputs(batch, 1024)

            def step():
                return model.compute_logits(model.forward(ids, pos, meta, state))

            ms = graph_ms_with(model, step)
            row = {"transposed": transposed, "batch": batch, "step_ms": ms,
                   "ratio": ms / (decode_floor_s(batch, 1024) * 1e3)}  # fmt: skip
            res["decode"].append(row)
            print(row, flush=True)
        n = 8192
        ids, pos, meta = chunk_inputs(n, 8192)
        ms = cuda_time(lambda: model.forward(ids, pos, meta, state), reps=5) * 1e3
        res["prefill"].setdefault(str(transposed), []).append(ms)
        print(f"prefill 8K chunk at ctx 8K, transposed={transposed}: {ms:.1f} ms", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exp_transposed_weights.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
