# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Experiment: the residual-add RMSNorm folded into the prologue of the GEMV after it (the MLP's
gate|up with its silu_mul epilogue, and the GDN input projection), against the two launches the decode
step runs today (pointwise.rms_norm on the output projection's split-K partials, then the GEMM). At
batch 1 the decode step is a chain of about 340 kernels, and the 73 norms are latency-bound launches
of their own (docs/benchmarks.md); here every program of the GEMV computes the row's inverse RMS
itself (K = 2048 values, read from L2), program 0 writes the new residual stream, and the normalised
activations are made tile by tile as the weights stream. Not wired into the model: this measures
whether it pays.

    TRITON_INTERPRET=1 python benchmarks/exp_norm_gemv.py --check     (CPU: the fused result against the
                                                                     two-launch path, tiny shapes)
    python benchmarks/exp_norm_gemv.py --out DIR [--batches 1,2,4,8,16]   (GPU: timings, real shapes)

The new residual stream equals the unfused one exactly (the same sums in the same order); the product
may differ in a few bf16 roundings, because the row's sum of squares is added up in chunks of BLOCK_K
rather than in one reduction.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.backends.base import SplitKPartials  # noqa: E402
from model.backends.triton_kernels import pdl  # noqa: E402
from model.backends.triton_kernels.gemm import decode_gemm  # noqa: E402
from model.backends.triton_kernels.pointwise import rms_norm  # noqa: E402

BF16 = torch.bfloat16


@triton.jit
def _residual_chunk(
    p_ptr, res_ptr, offs_m, mm, offs_k, mk, stride_ps, stride_pm, stride_res, SPLITS: tl.constexpr
):
    """[BLOCK_M, BLOCK_K] of the new residual stream in the model dtype: the partials added in split
    order and rounded, plus the residual, rounded (as pointwise.rms_norm makes it)."""
    mask = mm[:, None] & mk[None, :]
    acc = tl.zeros([offs_m.shape[0], offs_k.shape[0]], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(
            p_ptr + s * stride_ps + offs_m[:, None] * stride_pm + offs_k[None, :], mask=mask, other=0.0
        )
    dt = res_ptr.dtype.element_ty
    r = tl.load(res_ptr + offs_m[:, None] * stride_res + offs_k[None, :], mask=mask, other=0.0)
    return (acc.to(dt).to(tl.float32) + r.to(tl.float32)).to(dt)


@triton.jit
def _norm_gemv_kernel(
    p_ptr, res_ptr, nw_ptr, w_ptr, y_ptr, s_ptr, M, INTER, K, stride_ps, stride_pm, stride_res, stride_w, stride_y,
    stride_s, eps, num_progs,
    SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, SILU_MUL: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # INTER: output columns (with SILU_MUL the weight's up rows start at row INTER)
    pdl.prologue(USE_PDL)
    pid = tl.program_id(0)
    dt = y_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    mm = offs_m < M
    # the row's inverse RMS, every program for itself; program 0 stores the residual stream
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        s = _residual_chunk(p_ptr, res_ptr, offs_m, mm, offs_k, mk, stride_ps, stride_pm, stride_res, SPLITS)
        sf = s.to(tl.float32)
        sumsq += tl.sum(sf * sf, axis=1)
        if pid == 0:
            tl.store(s_ptr + offs_m[:, None] * stride_s + offs_k[None, :], s, mask=mm[:, None] & mk[None, :])
    inv = 1.0 / tl.sqrt(sumsq / K + eps)
    n_tiles = tl.cdiv(INTER, BLOCK_N)
    for tile in tl.range(pid, n_tiles, num_progs, num_stages=NUM_STAGES):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < INTER
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            s = _residual_chunk(
                p_ptr, res_ptr, offs_m, mm, offs_k, mk, stride_ps, stride_pm, stride_res, SPLITS
            )
            normed = (s.to(tl.float32) * inv[:, None]).to(dt).to(tl.float32)
            nw = tl.load(nw_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
            x = (normed * nw[None, :]).to(dt)
            wmask = mn[:, None] & mk[None, :]
            w = tl.load(
                w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :], mask=wmask, other=0.0
            )
            acc = tl.dot(x, tl.trans(w), acc)
            if SILU_MUL:
                w_up = tl.load(
                    w_ptr + (offs_n[:, None] + INTER).to(tl.int64) * stride_w + offs_k[None, :],
                    mask=wmask,
                    other=0.0,
                )
                acc_up = tl.dot(x, tl.trans(w_up), acc_up)
        out = acc
        if SILU_MUL:
            gate = acc.to(dt).to(tl.float32)  # the unfused path's roundings (gemm._store_unit)
            act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
            out = act * acc_up.to(dt).to(tl.float32)
        tl.store(
            y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], out.to(dt), mask=mm[:, None] & mn[None, :]
        )


def norm_gemv(
    partials: torch.Tensor,  # [S, M, K] fp32 split-K partials of the output projection
    residual: torch.Tensor,  # [M, K]
    norm_weight: torch.Tensor,  # [K]
    weight: torch.Tensor,  # [N, K], or gate|up [2 I, K] with silu_mul
    eps: float,
    silu_mul: bool = False,
    block_n: int = 64,
    block_k: int = 128,
    num_stages: int = 4,
    num_warps: int = 4,
    num_programs: int = 132,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T [M, N], or silu(gate) * up [M, I] with silu_mul, of x = rmsnorm(s) * norm_weight; s [M, K])
    with s = residual + sum(partials), the new residual stream."""
    splits, m, k = partials.shape
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    y = torch.empty((m, n), dtype=residual.dtype, device=residual.device)
    s = torch.empty((m, k), dtype=residual.dtype, device=residual.device)
    progs = min(num_programs, triton.cdiv(n, block_n))
    _norm_gemv_kernel[(progs,)](
        partials, residual, norm_weight, weight, y, s, m, n, k, partials.stride(0), partials.stride(1),
        residual.stride(0), weight.stride(0), y.stride(0), s.stride(0), eps, progs, SPLITS=splits,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages,
        SILU_MUL=silu_mul, num_warps=num_warps, **pdl.launch_kwargs(),
    )  # fmt: skip
    return y, s


def two_launches(partials, residual, norm_weight, weight, eps, silu_mul: bool, gemm_cfg: dict | None):
    """Today's path: the norm adds up the partials, then the GEMM (the fused gate|up + silu_mul one
    with silu_mul; cuBLAS where `gemm_cfg` is None)."""
    normed, s = rms_norm(SplitKPartials(partials, residual.dtype), norm_weight, eps, residual)
    if gemm_cfg is None:
        return torch.nn.functional.linear(normed, weight), s
    return decode_gemm(normed, weight, silu_mul=silu_mul, **gemm_cfg), s


def inputs(m: int, k: int, i: int, splits: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    partials = (torch.randn(splits, m, k, generator=g) * 0.5).to(device)
    residual = torch.randn(m, k, generator=g).to(BF16).to(device)
    norm_weight = (1.0 + 0.1 * torch.randn(k, generator=g)).to(BF16).to(device)
    gate_up = (torch.randn(2 * i, k, generator=g) * k**-0.5).to(BF16).to(device)
    return partials, residual, norm_weight, gate_up


def check() -> None:
    """The fused kernel against the two launches at tiny shapes (Triton's interpreter on a CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = ((1, 64, 48, 2, 16, 32, True), (3, 96, 40, 1, 32, 32, True), (5, 64, 32, 3, 16, 64, False))
    for m, k, i, splits, bn, bk, silu in cases:
        p, r, nw, w = inputs(m, k, i, splits, device, seed=m)
        y, s = norm_gemv(p, r, nw, w, 1e-6, silu, block_n=bn, block_k=bk, num_stages=2, num_programs=2)
        y_ref, s_ref = two_launches(p, r, nw, w, 1e-6, silu, {"block_n": bn, "block_k": bk, "num_stages": 2})
        assert torch.equal(s, s_ref), "the residual stream differs"
        err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
        assert err < 1e-2, f"product rel err {err:.2e}"
        print(f"M={m} K={k} N={w.shape[0]} silu_mul={silu}: residual stream equal, product rel err {err:.1e}")


@torch.inference_mode()
def timings(batches: list[int], out: Path) -> None:
    from sweep_gemm import ROTATE_BYTES, graph_time

    from model.backends.gemm_table import default_table

    pdl.ENABLED = pdl.supported()
    k, splits = 2048, 2  # hidden size; the partials of an output projection split in two
    table = default_table(torch.device("cuda"))
    rows = []
    # the MLP's gate|up with silu_mul (36 per step), the GDN input projection (27 per step, cuBLAS today)
    for name, n, silu in (("mlp_gate_up", 2 * 11008, True), ("gdn_in", 12320, False)):
        copies = max(2, -(-ROTATE_BYTES // (n * k * 2)))
        ws = [(torch.randn(n, k, device="cuda") * k**-0.5).to(BF16) for _ in range(copies)]
        for m in batches:
            p, r, nw, _ = inputs(m, k, 1, splits, "cuda")
            cfg = table.lookup(m, n, k, False, "silu_mul" if silu else "linear")
            if silu and cfg is None:
                cfg = {"block_n": 32, "block_k": 128, "num_stages": 4}
            base = graph_time([lambda w=w: two_launches(p, r, nw, w, 1e-6, silu, cfg) for w in ws])
            best, best_s = None, None
            for bn, stages, progs in itertools.product((16, 32, 64), (3, 4, 5), (132, 264)):
                c = {"block_n": bn, "num_stages": stages, "num_programs": progs}
                try:
                    s = graph_time([lambda w=w: norm_gemv(p, r, nw, w, 1e-6, silu, **c) for w in ws])
                except Exception as e:  # a config the compiler rejects
                    print(f"  {name} M={m} {c}: {type(e).__name__}", flush=True)
                    continue
                if best_s is None or s < best_s:
                    best, best_s = c, s
            row = {
                "gemm": name,
                "batch": m,
                "two_launches_us": base * 1e6,
                "two_launches_gemm": "cublas" if cfg is None else cfg,
                "fused_us": None if best_s is None else best_s * 1e6,
                "fused_config": best,
            }
            rows.append(row)
            print(
                f"M={m} {name}: norm + GEMM {base * 1e6:.2f} us, fused {row['fused_us']} us {best}",
                flush=True,
            )
        ws = None
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "exp_norm_gemv.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "rows": rows})
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,2,4,8,16")
    args = ap.parse_args()
    if args.check:
        check()
        return
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("timings need a GPU (use --check in the interpreter)")
    timings([int(b) for b in args.batches.split(",")], Path(args.out))


if __name__ == "__main__":
    main()
