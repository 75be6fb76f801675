# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Tune the decode GEMM table: for every projection of the 4B text decoder and the LM head, and for
each batch bucket, time cuBLAS (F.linear) against the persistent Triton GEMM over its launch
parameters and keep the Triton config only where it wins by 3% or more ("linear" entries). For the
MLP gate|up, time the fused gate|up GEMM with the silu_mul epilogue against the unfused path as the
backend runs it with the linear entries (linear, then the silu_mul kernel): "silu_mul" entries.
Writes the table that the Triton backend loads on Hopper (model/backends/decode_gemm_sm90.json by
default). `--ops`, `--shapes` and `--max-m` choose what to tune; the table's other entries are kept.
Triton kernels are timed with programmatic dependent launch where the backend would use it (`--pdl`):
with PDL a Triton GEMM's launch overlaps its predecessor's tail, which cuBLAS cannot do.

The output projections (MLP down, GDN and SWA o_proj) hand their split-K partial sums to the residual-add
RMSNorm after them (TritonBackend.split_k_into_norm), so their split-K configs are timed without the
reduction kernel (`--partial-out on`, the default; `off` times them as the backend ran before 1aa90de),
and every candidate of theirs, cuBLAS too, is timed together with that norm: a split that makes the
GEMM faster can make the norm slower by more.

Timings replay a CUDA graph of 20 calls cycling through 256 MB or more of weight copies (no L2 reuse),
as sweep_gemm.py does. With --ab, then times graph-captured decode steps with the new table against an
empty one (all cuBLAS), alternating, in the same process.

    python benchmarks/tune_decode_gemm.py --out DIR [--table PATH] [--ops linear,silu_mul] [--shapes all]
        [--max-m 128] [--buckets 1,64] [--pdl auto|on|off] [--partial-out on|off] [--ab]
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
from sweep_gemm import ROTATE_BYTES, graph_time, shapes

from model.backends.base import SplitKPartials
from model.backends.gemm_table import TABLE_SM90, DecodeGemmTable
from model.backends.triton_kernels import pdl
from model.backends.triton_kernels.gemm import decode_gemm

BF16 = torch.bfloat16
BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)
MARGIN = 0.97  # Triton must take at most this fraction of cuBLAS's time
# projections whose product goes straight into a residual-add RMSNorm (Backend.linear's `partial`)
OUTPUT_PROJECTIONS = frozenset({"mlp_down", "gdn_out", "swa_out"})


def program_counts(units: int, two_per_sm: bool = False, num_sms: int = 132) -> list[int]:
    """Persistent program counts worth timing for `units` work units: one per SM, two per SM (small
    tiles), and the fewest that give every program the same number of units."""
    balanced = -(-units // -(-units // num_sms))
    return sorted(
        {min(num_sms, units), balanced} | ({2 * num_sms} if two_per_sm and units > num_sms else set())
    )


def configs(m: int, n: int, has_bias: bool) -> list[dict]:
    out = []
    warps = (4, 8) if m >= 64 else (4,)
    for bn, stages, nw in itertools.product((32, 64, 128, 256), (3, 5), warps):
        if (m >= 64 and bn == 256) or (m <= 8 and nw == 8):
            continue
        tiles = -(-n // bn)
        for split in (1, 2, 4):
            if split > 1 and (has_bias or tiles >= 132 or tiles * split > 4 * 132):
                continue
            for progs in program_counts(tiles * split):
                out.append(
                    {"block_n": bn, "block_k": 128, "num_stages": stages, "num_warps": nw, "split_k": split}
                    | ({"num_programs": progs} if progs != 132 else {})
                )
    return out


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    """Random [n, k] weights, enough copies to cycle through ROTATE_BYTES (no L2 reuse)."""
    return [
        torch.randn(n, k, dtype=BF16, device=DEV) * 0.02
        for _ in range(max(2, -(-ROTATE_BYTES // (n * k * 2))))
    ]


def search(label: str, cfgs: list[dict], run, ws: list[torch.Tensor], ref: torch.Tensor, then=None):
    """(best config, its seconds per call) of `run(w, cfg)` over `cfgs`, timed over the weight copies
    `ws` (followed by `then(product)` where given, the consumer of the product); configs the compiler
    rejects or whose output is off `ref` by 1% or more are skipped. The winner is timed twice, as the
    baselines are. (None, None) when nothing ran."""

    consume = then if then is not None else (lambda y: y)

    def seconds(cfg: dict) -> float:
        return graph_time([lambda w=w: consume(run(w, cfg)) for w in ws])

    best, best_s = None, None
    for cfg in cfgs:
        try:
            out = run(ws[0], cfg).float()
            out = out.sum(0) if out.dim() == 3 else out  # split-K partials left unreduced
            err = ((out - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                print(f"  {label} {cfg}: rel err {err:.1e}", flush=True)
                continue
            s = seconds(cfg)
        except Exception as e:  # a config the compiler rejects (shared memory, registers): skip it
            print(f"  {label} {cfg}: {type(e).__name__}", flush=True)
            continue
        if best_s is None or s < best_s:
            best, best_s = cfg, s
    if best is not None:
        best_s = min(best_s, seconds(best))
    return best, best_s


def norm_after(m: int, n: int):
    """The residual-add RMSNorm that consumes an output projection's [m, n] product in a decode step
    (pointwise.rms_norm; it adds up split-K partials itself), for timing the pair: more K splits can
    make the GEMM faster and the norm slower (4 fp32 partials to read instead of one bf16 product),
    so a GEMM timed alone picked split-K configs that made the whole step slower
    (gpu_h100_f6b18f0_ab_decode_table_splitk4.json)."""
    from model.backends.triton_kernels.pointwise import rms_norm

    weight = torch.ones(n, dtype=BF16, device=DEV)
    residual = torch.randn(m, n, dtype=BF16, device=DEV)

    def then(y: torch.Tensor):
        if y.dim() == 3:  # partials, left unreduced (partial_out) for the norm to add up
            y = SplitKPartials(y, BF16)
        return rms_norm(y, weight, 1e-6, residual)

    return then


@torch.inference_mode()
def tune(names: set[str], buckets: tuple[int, ...] = BUCKETS, partial_out: bool = True) -> list[dict]:
    """partial_out: time the output projections' split-K configs without their reduction kernel (the
    norm after them adds the partials up). Output projections are timed with that norm after them,
    cuBLAS as well as Triton."""
    entries = []
    for name, n, k, _calls, has_bias in shapes():
        if name not in names:
            continue
        reduce = not (partial_out and name in OUTPUT_PROJECTIONS)
        ws = weight_copies(n, k)
        b = torch.randn(n, dtype=BF16, device=DEV) if has_bias else None
        for m in buckets:
            t0 = time.perf_counter()
            x = torch.randn(m, k, dtype=BF16, device=DEV)
            ref = F.linear(x.float(), ws[0].float(), None if b is None else b.float())
            then = norm_after(m, n) if name in OUTPUT_PROJECTIONS else (lambda y: y)
            cublas_s = min(graph_time([lambda w=w: then(F.linear(x, w, b)) for w in ws]) for _ in range(2))
            best, best_s = search(
                f"{name} M={m}",
                configs(m, n, has_bias),
                lambda w, cfg: decode_gemm(x, w, b, reduce=reduce, **cfg),
                ws,
                ref,
                then,
            )
            win = best is not None and best_s < MARGIN * cublas_s
            entry = {
                "name": name,
                "N": n,
                "K": k,
                "bias": has_bias,
                "max_m": m,
                "config": best if win else None,
                "cublas_us": round(cublas_s * 1e6, 2),
                "triton_us": round(best_s * 1e6, 2) if best_s is not None else None,
                "triton_config": best,
                "timed_unreduced": not reduce,
                "timed_with_norm": name in OUTPUT_PROJECTIONS,
            }
            entries.append(entry)
            print(
                f"{name} M={m}: cublas {entry['cublas_us']} us, triton {entry['triton_us']} us -> "
                f"{'triton' if win else 'cublas'} ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
        ws = None  # free the copies before the next shape
        torch.cuda.empty_cache()
    return entries


def silu_mul_configs(m: int, inter: int) -> list[dict]:
    """Launch parameters of the fused gate|up + silu_mul GEMM worth timing at batch m (at 48 rows
    and more also with TMA tile loads, which measured faster there: exp_tma_gemm.py)."""
    out = []
    for bn, bk, stages, nw in itertools.product((16, 32, 64, 128), (64, 128), (3, 4, 5), (4, 8)):
        if (nw == 8 and m < 64) or (bn == 128 and m >= 64) or (bn == 16 and m < 16):
            continue
        if bk == 64 and (m < 32 or stages < 4):
            continue  # half-depth K tiles only pay where deeper pipelines do (large M)
        for p in program_counts(-(-inter // bn), two_per_sm=bn <= 32):
            cfg = {"block_n": bn, "block_k": bk, "num_stages": stages, "num_warps": nw, "num_programs": p}
            out += [cfg, cfg | {"tma": True}] if m >= 48 else [cfg]
    return out


@torch.inference_mode()
def tune_silu_mul(linear_entries: list[dict], buckets: tuple[int, ...] = BUCKETS) -> list[dict]:
    """ "silu_mul" entries for the MLP gate|up: the fused GEMM against the backend's unfused path."""
    from model.backends.triton_backend import TritonBackend

    backend = TritonBackend(DEV)
    backend.gemm_table = DecodeGemmTable(linear_entries)  # no silu_mul entries: the unfused path
    (name, n, k, _calls, _bias) = next(s for s in shapes() if s[0] == "mlp_gate_up")
    ws = weight_copies(n, k)
    entries = []
    for m in buckets:
        t0 = time.perf_counter()
        x = torch.randn(m, k, dtype=BF16, device=DEV)
        ref = backend.linear_silu_mul(x, ws[0]).float()
        unfused_s = min(graph_time([lambda w=w: backend.linear_silu_mul(x, w) for w in ws]) for _ in range(2))
        best, best_s = search(
            f"silu_mul M={m}",
            silu_mul_configs(m, n // 2),
            lambda w, cfg: decode_gemm(x, w, None, silu_mul=True, **cfg),
            ws,
            ref,
        )
        win = best is not None and best_s < MARGIN * unfused_s
        entry = {
            "op": "silu_mul",
            "name": name,
            "N": n,
            "K": k,
            "bias": False,
            "max_m": m,
            "config": best if win else None,
            "unfused_us": round(unfused_s * 1e6, 2),
            "triton_us": round(best_s * 1e6, 2) if best_s is not None else None,
            "triton_config": best,
        }
        entries.append(entry)
        print(
            f"silu_mul M={m}: unfused {entry['unfused_us']} us, fused {entry['triton_us']} us -> "
            f"{'fused' if win else 'unfused'} ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return entries


@torch.inference_mode()
def step_ab(table: DecodeGemmTable, batches: list[int]) -> list[dict]:
    """Decode steps (CUDA graphs) with `table` vs an empty table, alternating A B A B."""
    from serving.cuda_graph import CudaGraphRunner

    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, max(batches))
    rows = []
    for use in (False, True, False, True):
        model.backend.gemm_table = table if use else DecodeGemmTable([])
        runner = CudaGraphRunner(model, state, max_batch=max(batches), device=DEV, sizes=batches)
        for ctx in (1024, 8192):
            for batch in batches:
                ids = torch.randint(0, 150000, (batch,), device=DEV)
                pos = torch.full((3, batch), ctx, dtype=torch.int64, device=DEV)
                slots = torch.arange(batch, device=DEV)
                ctx_t = torch.full((batch,), ctx, dtype=torch.int64, device=DEV)
                sec = cuda_time(lambda: runner.run(ids, pos, slots, ctx_t), reps=30)
                row = {
                    "table": use,
                    "batch": batch,
                    "ctx": ctx,
                    "step_ms": sec * 1e3,
                    "ratio": sec / decode_floor_s(batch, ctx),
                }
                rows.append(row)
                print(f"step {row}", flush=True)
        runner = None
        torch.cuda.empty_cache()
    return rows


def kept(old: list[dict], op: str, tuned: list[dict]) -> list[dict]:
    """The `op` entries of the old table that `tuned` does not replace (same name and bucket)."""
    done = {(e["name"], e["max_m"]) for e in tuned}
    return [e for e in old if e.get("op", "linear") == op and (e["name"], e["max_m"]) not in done]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--table", default=str(TABLE_SM90))
    ap.add_argument("--ab", action="store_true")
    ap.add_argument("--ops", default="linear,silu_mul")
    ap.add_argument("--shapes", default="all", help="linear shapes to tune (sweep_gemm.shapes names)")
    ap.add_argument("--batches", default="1,8,64,128")
    ap.add_argument("--max-m", type=int, default=max(BUCKETS), help="tune the buckets up to this batch only")
    ap.add_argument("--buckets", help="tune these batch buckets only (comma-separated, of BUCKETS)")
    ap.add_argument(
        "--pdl",
        choices=("auto", "on", "off"),
        default="auto",
        help="time the Triton kernels with PDL (pdl.py)",
    )
    ap.add_argument(
        "--partial-out",
        choices=("on", "off"),
        default="on",
        help="time the output projections' split-K configs without their reduction kernel",
    )
    args = ap.parse_args()
    if args.pdl != "auto":
        pdl.ENABLED = args.pdl == "on"
    buckets = tuple(m for m in BUCKETS if m <= args.max_m)
    if args.buckets:
        chosen = {int(b) for b in args.buckets.split(",")}
        if not chosen <= set(BUCKETS):
            raise SystemExit(f"--buckets: choose from {BUCKETS}")
        buckets = tuple(m for m in buckets if m in chosen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    ops = args.ops.split(",")
    names = {s[0] for s in shapes()} if args.shapes == "all" else set(args.shapes.split(","))
    old = json.loads(Path(args.table).read_text())["entries"] if Path(args.table).exists() else []
    linear = tune(names, buckets, args.partial_out == "on") if "linear" in ops else []
    fused = tune_silu_mul(linear + kept(old, "linear", linear), buckets) if "silu_mul" in ops else []
    # the table's other entries stay: other shapes, other ops, buckets above --max-m
    entries = sorted(
        linear + kept(old, "linear", linear) + fused + kept(old, "silu_mul", fused),
        key=lambda e: (e.get("op", "linear"), e["name"], e["max_m"]),
    )
    table = {
        "device": device,
        "measured_by": "benchmarks/tune_decode_gemm.py",
        "pdl": bool(pdl.launch_kwargs()["USE_PDL"]),
        "entries": entries,
    }
    Path(args.table).write_text(json.dumps(table, indent=1) + "\n")
    (out / "decode_gemm_table.json").write_text(json.dumps(table, indent=1) + "\n")
    if args.ab:
        rows = step_ab(DecodeGemmTable(entries), [int(b) for b in args.batches.split(",")])
        (out / "tune_decode_gemm_ab.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
