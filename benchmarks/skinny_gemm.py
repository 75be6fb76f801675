"""Skinny GEMM for decode: y [M, N] = x [M, K] @ W[N, K]^T (+ bias) for small M (a decode batch).

A candidate, not used by the model: benchmarks/sweep_gemm.py times it against cuBLAS (best of both per
shape saves about 0.2 ms of a batch-1 step; docs/benchmarks.md).

At small M the product only streams the weight, so its speed is the weight bytes over the copy
bandwidth. Each program owns a BLOCK_N slice of W's rows and one of SPLIT_K slices of K; with
SPLIT_K > 1 the fp32 partials [SPLIT_K, M, N] are summed (and the bias added) by a second kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_ys, stride_y, k_per_split,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = offs_m < M, offs_n < N
    k0 = split * k_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, k_per_split, BLOCK_K):
        offs_k = k0 + kk + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :],
            mask=mn[:, None] & mk[None, :],
            other=0.0,
        )
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + split * stride_ys + offs_m[:, None] * stride_y + offs_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _split_k_reduce_kernel(
    p_ptr, b_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int = 64,
    block_k: int = 128,
    split_k: int = 1,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """x [M, K] (M <= 64, unit stride on K) times weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if m > 64 or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("skinny_gemm expects M <= 64 and unit stride on K")
    block_m = max(16, triton.next_power_of_2(m))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = y if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), split_k)
    _skinny_gemm_kernel[grid](
        x, weight, bias if bias is not None else weight, partial, m, n, k, x.stride(0), weight.stride(0),
        m * n, n, k_per_split,
        HAS_BIAS=bias is not None and split_k == 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split_k > 1:
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            partial, bias if bias is not None else weight, y, m * n, n,
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block,
        )  # fmt: skip
    return y
