"""Persistent GEMM for decode batches: y [M, N] = x [M, K] @ W[N, K]^T (+ bias), M small (<= 128).
With SILU_MUL, W is an MLP's stacked gate|up weight [2 I, K] and y [M, I] = silu(x Wg^T) * (x Wu^T):
each unit streams the matching gate and up row tiles, so the [M, 2 I] product never goes to memory.

At decode the product streams the weight once; its speed is weight bytes over HBM bandwidth. A fixed
number of programs (about one per SM) walk the BLOCK_N row tiles of W round-robin, and the tile and K
loops are flattened into one software pipeline, so loads of the next tile are in flight while the
current tile's epilogue runs and no program pays a pipeline ramp per tile.

With `tma`, the tensor memory accelerator loads the x and W tiles (one instruction per tile, rows and
columns past the end read as zero), optionally with Triton's warp specialization (producer warps issue
the loads, consumer warps multiply). Results equal the pointer-load kernel's.

It is used only where it measured faster than cuBLAS (model.backends.gemm_table).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from model.backends.triton_kernels import pdl

DECODE_GEMM_MAX_M = 128  # the most rows decode_gemm takes (one BLOCK_M tile)


@triton.jit
def _store_unit(
    acc, acc_up, b_ptr, y_ptr, offs_m, mm, offs_n, mn, split, stride_y, stride_ys,
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
):  # fmt: skip
    """Epilogue of one work unit: silu(gate) * up (SILU_MUL) or + bias, stored to its split's rows."""
    if SILU_MUL:  # the unfused path's roundings: gate and up to the model dtype, then silu(gate)
        dt = y_ptr.dtype.element_ty
        gate = acc.to(dt).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        acc = act * acc_up.to(dt).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + split * stride_ys + offs_m[:, None] * stride_y + offs_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _decode_gemm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y, stride_ys, k_per_split,
    split_k, num_progs,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, FLATTEN: tl.constexpr, SILU_MUL: tl.constexpr, ROUND_OUT: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    # N: output columns (I with SILU_MUL: W's up rows start at row N); ROUND_OUT: y is wider than x,
    # and holds the product rounded to x's dtype (the LM head's fp32 logits). BLOCK_M 1: one row in
    # CUDA-core FMAs, [BLOCK_N, BLOCK_K] fp32 partial products reduced once per unit (no tensor-core
    # operand tiles, no padding rows)
    pdl.prologue(USE_PDL)
    pid = tl.program_id(0)
    GEMV: tl.constexpr = BLOCK_M == 1
    n_units = tl.cdiv(N, BLOCK_N) * split_k  # unit = (row tile, K split)
    k_iters = k_per_split // BLOCK_K
    offs_m = tl.arange(0, BLOCK_M)
    mm = offs_m < M
    for unit in tl.range(pid, n_units, num_progs, num_stages=NUM_STAGES, flatten=FLATTEN):
        tile = unit // split_k
        split = unit % split_k
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        if GEMV:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc2_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in range(k_iters):
            offs_k = split * k_per_split + ki * BLOCK_K + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            w_off = offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
            wmask = mn[:, None] & mk[None, :]
            w = tl.load(w_ptr + w_off, mask=wmask, other=0.0)
            if SILU_MUL:
                w_up = tl.load(w_ptr + N * stride_w + w_off, mask=wmask, other=0.0)
            if GEMV:
                x = tl.load(x_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
                acc2 += w.to(tl.float32) * x[None, :]
                if SILU_MUL:
                    acc2_up += w_up.to(tl.float32) * x[None, :]
            else:
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                    mask=mm[:, None] & mk[None, :],
                    other=0.0,
                )
                acc = tl.dot(x, tl.trans(w), acc)
                if SILU_MUL:
                    acc_up = tl.dot(x, tl.trans(w_up), acc_up)
        if GEMV:
            acc = tl.sum(acc2, axis=1)[None, :]
            acc_up = tl.sum(acc2_up, axis=1)[None, :]
        if ROUND_OUT:
            acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
        _store_unit(
            acc, acc_up, b_ptr, y_ptr, offs_m, mm, offs_n, mn, split, stride_y, stride_ys, HAS_BIAS, SILU_MUL
        )


@triton.jit
def _decode_gemm_tma_kernel(
    x_desc, w_desc, b_ptr, y_ptr, M, N, stride_y, stride_ys, k_per_split, split_k, num_progs,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, FLATTEN: tl.constexpr, SILU_MUL: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    # _decode_gemm_kernel with the x and W tiles loaded by the tensor memory accelerator (TMA): one
    # instruction per tile instead of per-thread loads; rows and columns past the end read as zero
    pdl.prologue(USE_PDL)
    pid = tl.program_id(0)
    n_units = tl.cdiv(N, BLOCK_N) * split_k
    k_iters = k_per_split // BLOCK_K
    offs_m = tl.arange(0, BLOCK_M)
    mm = offs_m < M
    for unit in tl.range(
        pid, n_units, num_progs, num_stages=NUM_STAGES, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
    ):
        tile = unit // split_k
        split = unit % split_k
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in range(k_iters):
            k0 = split * k_per_split + ki * BLOCK_K
            x = x_desc.load([0, k0])
            acc = tl.dot(x, tl.trans(w_desc.load([tile * BLOCK_N, k0])), acc)
            if SILU_MUL:  # a ragged last gate tile reads up rows: their columns are never stored
                acc_up = tl.dot(x, tl.trans(w_desc.load([tile * BLOCK_N + N, k0])), acc_up)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        _store_unit(
            acc,
            acc_up,
            b_ptr,
            y_ptr,
            offs_m,
            mm,
            offs_n,
            offs_n < N,
            split,
            stride_y,
            stride_ys,
            HAS_BIAS,
            SILU_MUL,
        )


@triton.jit
def _split_k_sum_kernel(p_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.prologue(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def decode_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int = 128,
    block_k: int = 128,
    split_k: int = 1,
    num_stages: int = 4,
    num_warps: int = 4,
    num_programs: int = 132,
    flatten: bool = True,
    silu_mul: bool = False,
    gemv: bool = False,
    tma: bool = False,
    warp_specialize: bool = False,
    reduce: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 128, unit stride on K) times weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype.

    split_k > 1 (no bias): each unit sums a K range into fp32 partials that a second kernel adds up;
    with reduce=False and more than one split made, the partials [S, M, N] fp32 are returned instead,
    for a consumer that adds them up itself (pointwise.rms_norm).
    silu_mul (no bias, split_k 1): weight is gate|up [2 I, K]; returns silu(gate) * up [M, I], rounded
    as `pointwise.silu_mul` rounds the unfused product.
    gemv: a single row (M = 1) in CUDA-core FMAs instead of a 16-row tensor-core tile (ignored for
    more rows and with tma).
    tma: TMA tile loads (x and weight 16-byte aligned, else the pointer-load kernel runs).
    out: an fp32 [M, N] tensor (unit stride on N) that receives the product rounded to x's dtype, as
    `F.linear(x, weight).float()` would, in one pass (no bias, no silu_mul); returned."""
    m, k = x.shape
    n = weight.shape[0]
    if m > DECODE_GEMM_MAX_M or x.stride(1) != 1 or weight.stride(1) != 1 or weight.shape[1] != k:
        raise ValueError("decode_gemm expects M <= 128, matching K and unit stride on K")
    if split_k > 1 and bias is not None:
        raise ValueError("decode_gemm: split_k with a bias is not supported")
    if silu_mul:
        if bias is not None or split_k != 1 or n % 2:
            raise ValueError("decode_gemm: silu_mul needs an even number of weight rows, no bias, split_k 1")
        n //= 2
    if out is not None and (bias is not None or silu_mul or out.dtype != torch.float32):
        raise ValueError("decode_gemm: out must be fp32, without bias or silu_mul")
    if out is not None and (out.shape != (m, n) or out.stride(1) != 1):
        raise ValueError("decode_gemm: out must be [M, N] with unit stride on N")
    block_m = 1 if gemv and m == 1 and not tma else max(16, triton.next_power_of_2(m))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    if out is not None and (split_k > 1 or tma):  # rounded once after the sum: the product, widened
        cfg = dict(block_n=block_n, block_k=block_k, split_k=split_k, num_stages=num_stages)
        cfg |= dict(num_warps=num_warps, num_programs=num_programs, flatten=flatten, tma=tma, gemv=gemv)
        return out.copy_(decode_gemm(x, weight, warp_specialize=warp_specialize, **cfg))
    reduce = reduce or split_k == 1
    if out is not None:  # one split, stored widened
        y = part = out
    else:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device) if reduce else None
        part = y if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    programs = min(num_programs, triton.cdiv(n, block_n) * split_k)
    launch = pdl.launch_kwargs()
    if tma and _tma_aligned(x, weight):
        x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [block_m, block_k])
        w_desc = TensorDescriptor(weight, list(weight.shape), [weight.stride(0), 1], [block_n, block_k])
        _decode_gemm_tma_kernel[(programs,)](
            x_desc, w_desc, bias if bias is not None else weight, part, m, n, n, m * n, k_per_split,
            split_k, programs, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, NUM_STAGES=num_stages, FLATTEN=flatten, SILU_MUL=silu_mul,
            WARP_SPECIALIZE=warp_specialize, num_warps=num_warps, **launch,
        )  # fmt: skip
        return _sum_splits(part, y, m * n, split_k) if reduce else part
    _decode_gemm_kernel[(programs,)](
        x, weight, bias if bias is not None else weight, part, m, n, k, x.stride(0), weight.stride(0),
        part.stride(-2), m * n, k_per_split, split_k, programs, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages, FLATTEN=flatten, SILU_MUL=silu_mul,
        ROUND_OUT=out is not None and x.dtype != torch.float32, num_warps=num_warps, **launch,
    )  # fmt: skip
    return _sum_splits(part, y, m * n, split_k) if reduce else part


def _tma_aligned(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


def _sum_splits(part: torch.Tensor, y: torch.Tensor, mn: int, split_k: int) -> torch.Tensor:
    """y = the sum of the split-K partials (y itself when there is one split)."""
    if split_k > 1:
        block = 1024
        _split_k_sum_kernel[(triton.cdiv(mn, block),)](
            part, y, mn, SPLIT_K=split_k, BLOCK=block, **pdl.launch_kwargs()
        )
    return y
