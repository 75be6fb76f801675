"""The residual-add RMSNorm folded into the decode GEMV after it, with the norm's scale applied last.

At batch 1 each block norm is a latency-bound launch of its own (about 3.5 µs on an H100 for a
2048-wide row) between two GEMVs on the critical path, 73 per step. The GEMV can take it over
without a pass of its own, because the norm's one row statistic is a scalar factor of the product:

    rmsnorm(s) * g @ W^T  =  inv(s) * ((s * g) @ W^T),   inv(s) = 1 / sqrt(mean(s^2) + eps)

So every program streams the row's residual stream s (the previous output projection's split-K
partials added in split order and rounded, plus the residual, rounded: the fused norm's own sums),
chunk by chunk in the same software pipeline as the weight tiles, accumulates s^2 as it goes, and
multiplies its accumulators by inv(s) in the epilogue. The program that owns the first row tile
also stores s, the new residual stream (bit-identical to the fused norm's). An earlier version that
computed inv(s) in a pass before the weight stream and rebuilt the normalised activation for every
tile cost about 10 µs per GEMV (docs/benchmarks.md); here nothing stands before the first weight
load.

Roundings: the fused norm rounds s * inv to the model dtype and then the product with g; here
s * g is rounded once and inv scales the fp32 accumulator. The two differ in bf16 roundings of the
activations (relative 2^-9 per element, not in a systematic direction), as two reduction orders of
the GEMM would.

At one row (BLOCK_M 1, the batch-1 decode) the product is a GEMV in CUDA-core FMAs: the activation
chunk is made in registers in the slice layout the weight tile needs, and [BLOCK_N, BLOCK_K] partial
products accumulate element-wise, reduced once per row tile, so no tile goes through shared memory
for a tensor-core operand. Larger batches (BLOCK_M 16+) use tl.dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.backends.base import SplitKPartials
from model.backends.gemm_table import NORM_GEMM_MAX_M
from model.backends.triton_kernels import pdl
from model.backends.triton_kernels.pointwise import gated_norm_math


@triton.jit
def _stream_tile(
    x_ptr, res_ptr, s_ptr, offs_m, mm, offs_k, mk, store, stride_xs, stride_x, stride_res, stride_s,
    SPLITS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_S: tl.constexpr, ONE_ROW: tl.constexpr,
):  # fmt: skip
    """One chunk of the residual stream s in the model dtype ([BLOCK_K] at ONE_ROW, else
    [BLOCK_M, BLOCK_K]), stored to s_ptr where `store` (the fused norm's sums and roundings)."""
    dt = s_ptr.dtype.element_ty
    if ONE_ROW:
        x_off = offs_k
        r_off = offs_k
        s_off = offs_k
        mask = mk
    else:
        x_off = offs_m[:, None] * stride_x + offs_k[None, :]
        r_off = offs_m[:, None] * stride_res + offs_k[None, :]
        s_off = offs_m[:, None] * stride_s + offs_k[None, :]
        mask = mm[:, None] & mk[None, :]
    if SPLITS > 0:  # fp32 split-K partials, added in split order and rounded once
        part = tl.load(x_ptr + x_off, mask=mask, other=0.0)
        for sp in tl.static_range(1, SPLITS):
            part += tl.load(x_ptr + sp * stride_xs + x_off, mask=mask, other=0.0)
        s = part.to(dt)
    else:
        s = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(dt)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + r_off, mask=mask, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(dt)
    if STORE_S:
        tl.store(s_ptr + s_off, s, mask=mask & store)
    return s


@triton.jit
def _norm_gemm_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, s_ptr, M, N, K, stride_xs, stride_x, stride_res,
    stride_w, stride_y, stride_s, eps, num_progs,
    SPLITS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_S: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    FLATTEN: tl.constexpr, SILU_MUL: tl.constexpr, ROUND_OUT: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # N: output columns (with SILU_MUL the weight's up rows start at row N); ROUND_OUT: y is fp32 and
    # holds the product rounded to the model dtype (the LM head's logits)
    pdl.prologue(USE_PDL)
    pid = tl.program_id(0)
    dt = s_ptr.dtype.element_ty
    ONE_ROW: tl.constexpr = BLOCK_M == 1
    n_units = tl.cdiv(N, BLOCK_N)
    k_iters = tl.cdiv(K, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mm = offs_m < M
    for unit in tl.range(pid, n_units, num_progs, num_stages=NUM_STAGES, flatten=FLATTEN):
        offs_n = unit * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        if ONE_ROW:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc2_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            sq2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for ki in range(k_iters):
            offs_k = ki * BLOCK_K + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            s = _stream_tile(
                x_ptr, res_ptr, s_ptr, offs_m, mm, offs_k, mk, unit == 0, stride_xs, stride_x,
                stride_res, stride_s, SPLITS, HAS_RESIDUAL, STORE_S, ONE_ROW,
            )  # fmt: skip
            sf = s.to(tl.float32)
            g = tl.load(nw_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
            w_off = offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
            wmask = mn[:, None] & mk[None, :]
            w = tl.load(w_ptr + w_off, mask=wmask, other=0.0)
            if SILU_MUL:
                w_up = tl.load(w_ptr + N * stride_w + w_off, mask=wmask, other=0.0)
            if ONE_ROW:
                sq += sf * sf
                xg = (sf * g).to(dt).to(tl.float32)
                acc2 += w.to(tl.float32) * xg[None, :]
                if SILU_MUL:
                    acc2_up += w_up.to(tl.float32) * xg[None, :]
            else:
                sq2 += sf * sf
                xg = (sf * g[None, :]).to(dt)
                acc = tl.dot(xg, tl.trans(w), acc)
                if SILU_MUL:
                    acc_up = tl.dot(xg, tl.trans(w_up), acc_up)
        if ONE_ROW:
            inv = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
            acc = (tl.sum(acc2, axis=1) * inv)[None, :]
            acc_up = (tl.sum(acc2_up, axis=1) * inv)[None, :]
        else:
            inv = 1.0 / tl.sqrt(tl.sum(sq2, axis=1) / K + eps)
            acc = acc * inv[:, None]
            acc_up = acc_up * inv[:, None]
        if SILU_MUL:  # the unfused path's roundings: gate and up to the model dtype, then silu(gate)
            gate = acc.to(dt).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
            acc = act * acc_up.to(dt).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :]
        if ROUND_OUT:
            acc = acc.to(dt).to(tl.float32)
        out = y_ptr + offs_m[:, None] * stride_y + offs_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def norm_gemm(
    x: torch.Tensor | SplitKPartials,  # [M, K] model dtype, or an output projection's split-K partials
    residual: torch.Tensor | None,  # [M, K] model dtype; None: s = x (the first block's input)
    norm_weight: torch.Tensor,  # [K] model dtype
    eps: float,
    weight: torch.Tensor,  # [N, K], or an MLP's gate|up [2 I, K] with silu_mul
    bias: torch.Tensor | None = None,  # [N]
    silu_mul: bool = False,
    out: torch.Tensor | None = None,  # fp32 [M, N]: the product rounded to the model dtype, widened
    block_n: int = 64,
    block_k: int = 128,
    num_stages: int = 4,
    num_warps: int = 4,
    num_programs: int = 132,
    flatten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, s): s = residual + x, the new residual stream [M, K] (x itself, rounded, where nothing is
    added), and y = (rmsnorm(s) * norm_weight) W^T (+ bias) [M, N], or silu(gate) * up [M, I] with
    silu_mul, or `out` filled. M <= NORM_GEMM_MAX_M; unit stride on every last dimension."""
    if isinstance(x, SplitKPartials):
        parts, dtype = x.partials, x.dtype
        splits, m, k = parts.shape
    else:
        parts, dtype, splits = x, x.dtype, 0
        m, k = x.shape
    if m > NORM_GEMM_MAX_M:
        raise ValueError(f"norm_gemm takes at most {NORM_GEMM_MAX_M} rows, got {m}")
    if weight.shape[1] != k or norm_weight.shape != (k,):
        raise ValueError("norm_gemm: the weight and the norm weight must match the row width")
    for t in (parts, residual, weight, norm_weight, bias, out):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("norm_gemm expects unit stride on every last dimension")
    if silu_mul and (bias is not None or out is not None or weight.shape[0] % 2):
        raise ValueError("norm_gemm: silu_mul needs an even number of weight rows, no bias, no out")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    if out is not None and (out.dtype != torch.float32 or out.shape != (m, n) or bias is not None):
        raise ValueError("norm_gemm: out must be fp32 [M, N], without bias")
    own_stream = residual is not None or splits > 0
    s = torch.empty((m, k), dtype=dtype, device=weight.device) if own_stream else x
    y = out if out is not None else torch.empty((m, n), dtype=dtype, device=weight.device)
    if m == 0:
        return y, s
    programs = min(num_programs, triton.cdiv(n, block_n))
    res = residual if residual is not None else s
    _norm_gemm_kernel[(programs,)](
        parts, res, norm_weight, weight, bias if bias is not None else weight, y, s, m, n, k,
        parts.stride(0) if splits else 0, parts.stride(-2), res.stride(0), weight.stride(0), y.stride(0),
        s.stride(0), eps, programs, SPLITS=splits, HAS_RESIDUAL=residual is not None, STORE_S=own_stream,
        HAS_BIAS=bias is not None, BLOCK_M=1 if m == 1 else max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages, FLATTEN=flatten, SILU_MUL=silu_mul,
        ROUND_OUT=out is not None, num_warps=num_warps, **pdl.launch_kwargs(),
    )  # fmt: skip
    return y, s


@triton.jit
def _gated_norm_gemv_kernel(
    o_ptr, z_ptr, nw_ptr, w_ptr, y_ptr, N, H, stride_oh, stride_w, stride_ys, eps, heads_per_split,
    split_k, num_progs,
    DV: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr, FLATTEN: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    # one row: y[split] = partial sums over the split's heads of W[:, head] . x_head, x_head the
    # gated norm of the head (the K block is one head, so its statistic is the block's own)
    pdl.prologue(USE_PDL)
    pid = tl.program_id(0)
    dt = w_ptr.dtype.element_ty
    n_units = tl.cdiv(N, BLOCK_N) * split_k
    offs_v = tl.arange(0, DV)
    g = tl.load(nw_ptr + offs_v).to(tl.float32)
    for unit in tl.range(pid, n_units, num_progs, num_stages=NUM_STAGES, flatten=FLATTEN):
        tile = unit // split_k
        split = unit % split_k
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        acc2 = tl.zeros([BLOCK_N, DV], dtype=tl.float32)
        for hi in range(heads_per_split):
            h = split * heads_per_split + hi
            mh = h < H
            o = tl.load(o_ptr + h * stride_oh + offs_v, mask=mh, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + h * DV + offs_v, mask=mh, other=0.0).to(tl.float32)
            x = gated_norm_math(o, z, g, eps, DV).to(dt).to(tl.float32)  # the gated norm's rounding
            w_off = offs_n[:, None].to(tl.int64) * stride_w + (h * DV + offs_v)[None, :]
            w = tl.load(w_ptr + w_off, mask=mn[:, None] & mh, other=0.0)
            acc2 += w.to(tl.float32) * x[None, :]
        acc = tl.sum(acc2, axis=1)
        tl.store(y_ptr + split * stride_ys + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mn)


def gated_norm_gemv(
    o: torch.Tensor,  # [1, H, d_v] the delta-rule output (unit stride on d_v)
    z: torch.Tensor,  # [1, H * d_v] the output gate (unit stride)
    norm_weight: torch.Tensor,  # [d_v] fp32
    eps: float,
    weight: torch.Tensor,  # [N, H * d_v] the output projection
    block_n: int = 32,
    split_k: int = 4,
    num_stages: int = 3,
    num_warps: int = 4,
    num_programs: int = 132,
    flatten: bool = True,
) -> torch.Tensor | SplitKPartials:
    """The GDN layer's gated output norm (rmsnorm(o) * weight * silu(z) per head, rounded once, as
    `pointwise.gated_rms_norm`) folded into the output projection, for one row: each K block is
    one head. Returns the product [1, N] in o's dtype, or its fp32 split-K partials [S, 1, N]
    (SplitKPartials, summed heads in split order) when split_k > 1."""
    _, h, dv = o.shape
    n = weight.shape[0]
    if o.shape[0] != 1 or z.shape != (1, h * dv) or weight.shape[1] != h * dv or norm_weight.shape != (dv,):
        raise ValueError("gated_norm_gemv: one row, o [1, H, d_v], z [1, H d_v], weight [N, H d_v]")
    if dv & (dv - 1) or o.stride(2) != 1 or z.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("gated_norm_gemv: d_v a power of two, unit stride on the last dimensions")
    heads_per_split = triton.cdiv(h, split_k)
    split_k = triton.cdiv(h, heads_per_split)
    if split_k > 1:
        y = torch.empty((split_k, 1, n), dtype=torch.float32, device=o.device)
    else:
        y = torch.empty((1, 1, n), dtype=o.dtype, device=o.device)
    programs = min(num_programs, triton.cdiv(n, block_n) * split_k)
    _gated_norm_gemv_kernel[(programs,)](
        o, z, norm_weight, weight, y, n, h, o.stride(1), weight.stride(0), n, eps, heads_per_split, split_k,
        programs, DV=dv, BLOCK_N=block_n, NUM_STAGES=num_stages, FLATTEN=flatten, num_warps=num_warps,
        **pdl.launch_kwargs(),
    )  # fmt: skip
    return SplitKPartials(y, o.dtype) if split_k > 1 else y[0]
