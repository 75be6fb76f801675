"""The residual-add RMSNorm folded into the decode GEMV after it: one launch instead of two.

At small decode batches every norm of the step is a latency-bound launch of its own (about 3.5 µs on
an H100 for a 2048-wide row) standing between two GEMVs on the critical path. Here the GEMV does the
norm itself: every program adds up the row's residual stream (the previous output projection's
split-K partials, or its product, plus the residual) chunk by chunk and takes the inverse RMS (K
values read from L2), program 0 also stores the new residual stream, and then the normalised
activations are made tile by tile as the weight rows stream past. With `silu_mul` the weight is an
MLP's gate|up and the epilogue stores silu(gate) * up (as `gemm.decode_gemm` with silu_mul).

Roundings are the two launches' (`pointwise.rms_norm`, then the GEMM): the residual stream equals
theirs bit for bit (the same sums in the same order); the product may differ in a few bf16 roundings,
because the row's sum of squares is added up in chunks of BLOCK_K rather than in one reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.backends.base import SplitKPartials
from model.backends.triton_kernels import pdl

NORM_GEMM_MAX_M = 16  # rows of a batch held in one tile (BLOCK_M); larger batches keep two launches


@triton.jit
def _stream_chunk(
    x_ptr, res_ptr, offs_m, mm, offs_k, mk, stride_xs, stride_xm, stride_res, SPLITS: tl.constexpr
):  # fmt: skip
    """[BLOCK_M, BLOCK_K] of the new residual stream in the model dtype: x (its SPLITS partials added
    in split order, or one tensor) rounded, plus the residual, rounded (as pointwise.rms_norm)."""
    mask = mm[:, None] & mk[None, :]
    acc = tl.zeros([offs_m.shape[0], offs_k.shape[0]], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        part = tl.load(
            x_ptr + s * stride_xs + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0
        )
        acc += part.to(tl.float32)
    dt = res_ptr.dtype.element_ty
    r = tl.load(res_ptr + offs_m[:, None] * stride_res + offs_k[None, :], mask=mask, other=0.0)
    return (acc.to(dt).to(tl.float32) + r.to(tl.float32)).to(dt)


@triton.jit
def _norm_gemm_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, y_ptr, s_ptr, M, N, K, stride_xs, stride_xm, stride_res, stride_w,
    stride_y, stride_s, eps, num_progs,
    SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, SILU_MUL: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # N: output columns (with SILU_MUL the weight's up rows start at row N)
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
        s = _stream_chunk(x_ptr, res_ptr, offs_m, mm, offs_k, mk, stride_xs, stride_xm, stride_res, SPLITS)
        sf = s.to(tl.float32)
        sumsq += tl.sum(sf * sf, axis=1)
        if pid == 0:
            tl.store(s_ptr + offs_m[:, None] * stride_s + offs_k[None, :], s, mask=mm[:, None] & mk[None, :])
    inv = 1.0 / tl.sqrt(sumsq / K + eps)
    n_tiles = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(pid, n_tiles, num_progs, num_stages=NUM_STAGES):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            s = _stream_chunk(
                x_ptr, res_ptr, offs_m, mm, offs_k, mk, stride_xs, stride_xm, stride_res, SPLITS
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
                    w_ptr + (offs_n[:, None] + N).to(tl.int64) * stride_w + offs_k[None, :],
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


def norm_gemm(
    x: torch.Tensor | SplitKPartials,  # [M, K] model dtype, or an output projection's split-K partials
    residual: torch.Tensor,  # [M, K] model dtype
    norm_weight: torch.Tensor,  # [K]
    weight: torch.Tensor,  # [N, K], or an MLP's gate|up [2 I, K] with silu_mul
    eps: float,
    silu_mul: bool = False,
    block_n: int = 32,
    block_k: int = 128,
    num_stages: int = 4,
    num_warps: int = 4,
    num_programs: int = 132,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, s): s = residual + x, the new residual stream [M, K], and y = n W^T [M, N] (silu(gate) * up
    [M, I] with silu_mul) of n = rmsnorm(s) * norm_weight; M <= NORM_GEMM_MAX_M. Every tensor has unit
    stride on its last dimension."""
    if isinstance(x, SplitKPartials):
        parts = x.partials
    else:
        parts = x.unsqueeze(0)  # one "split": the product itself, rounded already
    splits, m, k = parts.shape
    if m > NORM_GEMM_MAX_M:
        raise ValueError(f"norm_gemm takes at most {NORM_GEMM_MAX_M} rows, got {m}")
    if parts.stride(-1) != 1 or residual.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("norm_gemm expects unit stride on K")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    y = torch.empty((m, n), dtype=residual.dtype, device=residual.device)
    s = torch.empty((m, k), dtype=residual.dtype, device=residual.device)
    if m == 0:
        return y, s
    progs = min(num_programs, triton.cdiv(n, block_n))
    _norm_gemm_kernel[(progs,)](
        parts, residual, norm_weight, weight, y, s, m, n, k, parts.stride(0), parts.stride(1),
        residual.stride(0), weight.stride(0), y.stride(0), s.stride(0), eps, progs, SPLITS=splits,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages,
        SILU_MUL=silu_mul, num_warps=num_warps, **pdl.launch_kwargs(),
    )  # fmt: skip
    return y, s
