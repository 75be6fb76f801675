# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Tune the GDN gated norm folded into the output projection's GEMV (`norm_gemm.gated_norm_gemv`, batch
1) against its two launches (the gated-norm kernel, then the shipped table's GEMM leaving split-K
partials), graph replays over 256 MB or more of weight copies, PDL on where the GPU has it; at most
one program per SM (configs with more lost in the whole step, docs/benchmarks.md).

Writes `gated_norm_entries.json` ({"table": [one "gated_norm_linear" entry: the fastest config]}) for
`ab_decode.py --switches extra --extra-table PATH`.

    python benchmarks/tune_gated_norm.py --out DIR      (GPU)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import load_cfg  # noqa: E402
from sweep_gemm import ROTATE_BYTES, graph_time  # noqa: E402

from model.backends.triton_backend import TritonBackend  # noqa: E402
from model.backends.triton_kernels import pdl  # noqa: E402
from model.backends.triton_kernels.norm_gemm import gated_norm_gemv  # noqa: E402

BF16 = torch.bfloat16


@torch.inference_mode()
def tune(out: Path) -> None:
    pdl.ENABLED = pdl.supported()
    t = load_cfg().text
    heads, dv, n = t.num_linear_heads, t.linear_value_dim, t.hidden_size
    k = heads * dv
    backend = TritonBackend("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copies = max(2, -(-ROTATE_BYTES // (n * k * 2)))
    ws = [(torch.randn(n, k, device="cuda") * k**-0.5).to(BF16) for _ in range(copies)]
    o = torch.randn(1, heads, dv, device="cuda").to(BF16)
    z = torch.randn(1, k, device="cuda").to(BF16)
    nw = 1.0 + 0.1 * torch.randn(dv, device="cuda")
    base = min(
        graph_time([lambda w=w: backend.gated_norm_linear(o, z, nw, 1e-6, w, partial=True) for w in ws])
        for _ in range(2)
    )
    ref = backend.gated_norm_linear(o, z, nw, 1e-6, ws[0]).float()
    results = []
    for bn, sk, st in itertools.product((16, 32, 64), (4, 8, 16), (2, 3)):
        units = -(-n // bn) * sk
        cfg = {"block_n": bn, "split_k": sk, "num_stages": st, "num_programs": min(sms, units)}
        while units % cfg["num_programs"] and cfg["num_programs"] > sms // 2:  # balanced
            cfg["num_programs"] -= 1
        try:
            with pdl.warmup():
                y = gated_norm_gemv(o, z, nw, 1e-6, ws[0], **cfg)
            err = ((y.total().float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                print(f"  {cfg}: wrong result (rel err {err:.1e})", flush=True)
                continue
            tm = graph_time([lambda w=w: gated_norm_gemv(o, z, nw, 1e-6, w, **cfg) for w in ws])
        except Exception as e:  # a config the compiler rejects
            print(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        results.append((tm, cfg))
    results.sort(key=lambda r: r[0])
    best_s, best = results[0]
    print(f"gdn_out M=1: gated norm + GEMM {base * 1e6:.2f} us, folded {best_s * 1e6:.2f} us {best}")
    entry = {"op": "gated_norm_linear", "name": "gdn_out", "N": n, "K": k, "bias": False, "max_m": 1}
    entry |= {"config": best, "two_launches_us": round(base * 1e6, 2), "folded_us": round(best_s * 1e6, 2)}
    entry["next_best"] = [(round(s * 1e6, 2), c) for s, c in results[1:4]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gated_norm_entries.json").write_text(json.dumps({"table": [entry]}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tuning needs a GPU")
    tune(Path(args.out))


if __name__ == "__main__":
    main()
