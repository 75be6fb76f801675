"""The decode MLP of a small batch in one persistent launch: h = silu(x Wg^T) * (x Wu^T), then the
down projection's split-K partial sums p [S, M, N] = the K splits of h Wd^T.

At batch 1 each of the two products streams its weight at HBM bandwidth but pays a ramp and a tail:
the first loads wait a memory latency, the last programs finish alone, and the next kernel starts only
when every program has exited. Here one grid runs both phases. A program that has stored its share of
h raises a counter; before it waits for the counter to reach the number of programs, it asks L2 to
prefetch the head of its first down-projection tile (`prefetch2` columns), so HBM keeps streaming
while the slowest programs finish the first phase. `prefetch1` does the same for the gate|up rows of
its first tile before the PDL wait for the previous kernel (the weights do not depend on it).

The grid barrier needs every program resident at once: `num_programs` is at most the number of SMs
and a program's shared memory leaves room for one per SM. Its counters (`flags`, int32, zero at
rest) are reset by the last program to leave, so the next launch finds them at zero; a CUDA graph may
replay the launch any number of times. Triton's CPU interpreter runs programs one after another, so
there (and with `one_launch=False`) the phases run as two launches without the counters.

The arithmetic is `decode_gemm`'s: gate|up rounded as its SILU_MUL epilogue rounds them, the down
partials summed over the same K blocks, so with matching block sizes the result equals
`decode_gemm(x, gate_up, silu_mul=True)` followed by `decode_gemm(h, down, split_k=S, reduce=False)`
bit for bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from model.backends.triton_kernels import pdl

FUSED_MLP_MAX_M = 16  # one BLOCK_M tile of rows
FLAG_WORDS = 32  # int32 counters per flags buffer (one 128-byte line; two are used)


@triton.jit
def _prefetch_rows(w_ptr, rows, stride_w, k0, ncols, PREFETCH: tl.constexpr):
    """Ask L2 for min(PREFETCH, ncols) columns from k0 of each weight row (one bulk prefetch per row);
    returns 0 (added to a counter, so the compiler keeps the instructions)."""
    cols = tl.minimum(ncols, PREFETCH) // 8 * 8  # whole 16-byte units of bf16
    nbytes = (cols * 2).to(tl.int32)
    ptrs = w_ptr + rows.to(tl.int64) * stride_w + k0
    done = tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; } mov.u32 $0, 0;",
        "=r,l,r",
        [ptrs, tl.zeros_like(rows) + nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
    return tl.sum(done, axis=0)


@triton.jit
def _fused_mlp_kernel(
    x_ptr, w1_ptr, w2_ptr, h_ptr, p_ptr, flags_ptr, M, INTER, N2, K1, stride_x, stride_w1, stride_w2, stride_h,
    stride_ps, k2_per_split, split_k2, num_progs,
    BLOCK_M: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, BN2: tl.constexpr, BK2: tl.constexpr,
    NUM_STAGES: tl.constexpr, PHASE: tl.constexpr, PREFETCH1: tl.constexpr, PREFETCH2: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    # PHASE 0: both phases with the grid barrier; 1: gate|up only; 2: down only (after a PHASE 1 launch)
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    mm = offs_m < M
    dt = h_ptr.dtype.element_ty
    n1 = tl.cdiv(INTER, BN1)
    n2 = tl.cdiv(N2, BN2) * split_k2
    zero = pid * 0  # an int32 tensor: the prefetch helpers add their 0 to it
    if PREFETCH1 > 0 and PHASE != 2:  # the weights do not depend on the previous kernel's output
        rows1 = tl.minimum(pid * BN1 + tl.arange(0, BN1), INTER - 1)
        zero += _prefetch_rows(w1_ptr, rows1, stride_w1, 0, K1, PREFETCH1)
        zero += _prefetch_rows(w1_ptr, rows1 + INTER, stride_w1, 0, K1, PREFETCH1)
    pdl.prologue(USE_PDL)
    if PHASE != 2:
        for t in tl.range(pid, n1, num_progs, num_stages=NUM_STAGES, flatten=True):
            offs_n = t * BN1 + tl.arange(0, BN1)
            mn = offs_n < INTER
            acc_g = tl.zeros([BLOCK_M, BN1], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BN1], dtype=tl.float32)
            for ki in range(tl.cdiv(K1, BK1)):
                offs_k = ki * BK1 + tl.arange(0, BK1)
                mk = offs_k < K1
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mm[:, None] & mk[None, :]
                )
                w_rows = w1_ptr + offs_n[:, None].to(tl.int64) * stride_w1 + offs_k[None, :]
                wmask = mn[:, None] & mk[None, :]
                acc_g = tl.dot(x, tl.trans(tl.load(w_rows, mask=wmask, other=0.0)), acc_g)
                acc_u = tl.dot(x, tl.trans(tl.load(w_rows + INTER * stride_w1, mask=wmask, other=0.0)), acc_u)
            gate = acc_g.to(dt).to(tl.float32)  # decode_gemm's SILU_MUL roundings
            act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
            hv = act * acc_u.to(dt).to(tl.float32)
            tl.store(
                h_ptr + offs_m[:, None] * stride_h + offs_n[None, :],
                hv.to(dt),
                mask=mm[:, None] & mn[None, :],
            )
    if PHASE == 0:
        if PREFETCH2 > 0 and pid < n2:  # the head of this program's first down tile, while others finish
            tile = pid // split_k2
            k0 = (pid % split_k2) * k2_per_split
            rows2 = tl.minimum(tile * BN2 + tl.arange(0, BN2), N2 - 1)
            zero += _prefetch_rows(
                w2_ptr, rows2, stride_w2, k0, tl.minimum(k2_per_split, INTER - k0), PREFETCH2
            )
        tl.debug_barrier()  # every thread's stores of h precede the release below
        tl.atomic_add(flags_ptr, 1 + zero, sem="release", scope="gpu")
        arrived = tl.atomic_add(flags_ptr, 0, sem="acquire", scope="gpu")
        while arrived < num_progs:
            arrived = tl.atomic_add(flags_ptr, 0, sem="acquire", scope="gpu")
    if PHASE != 1:
        for u in tl.range(pid, n2, num_progs, num_stages=NUM_STAGES, flatten=True):
            tile = u // split_k2
            split = u % split_k2
            offs_n = tile * BN2 + tl.arange(0, BN2)
            mn = offs_n < N2
            acc = tl.zeros([BLOCK_M, BN2], dtype=tl.float32)
            for ki in range(k2_per_split // BK2):
                offs_k = split * k2_per_split + ki * BK2 + tl.arange(0, BK2)
                mk = offs_k < INTER
                hv = tl.load(
                    h_ptr + offs_m[:, None] * stride_h + offs_k[None, :],
                    mask=mm[:, None] & mk[None, :],
                    other=0.0,
                    cache_modifier=".cg",  # written by other programs of this launch: L2, not a stale L1
                )
                w = tl.load(
                    w2_ptr + offs_n[:, None].to(tl.int64) * stride_w2 + offs_k[None, :],
                    mask=mn[:, None] & mk[None, :],
                    other=0.0,
                )
                acc = tl.dot(hv, tl.trans(w), acc)
            out = p_ptr + split * stride_ps + offs_m[:, None] * N2 + offs_n[None, :]
            tl.store(out, acc, mask=mm[:, None] & mn[None, :])
    if PHASE == 0:  # the last program out resets the counters for the next launch
        left = tl.atomic_add(flags_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if left == num_progs - 1:
            tl.atomic_xchg(flags_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(flags_ptr + 1, 0, sem="relaxed", scope="gpu")


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_mlp_flags(device: torch.device | str) -> torch.Tensor:
    """A zeroed counter buffer for `fused_mlp` (one per device is enough: launches on one stream)."""
    return torch.zeros(FLAG_WORDS, dtype=torch.int32, device=device)


def fused_mlp(
    x: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    flags: torch.Tensor,
    block_n1: int = 32,
    block_k1: int = 128,
    block_n2: int = 64,
    block_k2: int = 128,
    split_k2: int = 4,
    num_stages: int = 5,
    num_warps: int = 4,
    num_programs: int = 128,
    prefetch1: int = 0,
    prefetch2: int = 0,
    one_launch: bool | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 16), gate_up_weight [2 I, K] (gate rows, then up rows), down_weight [N, I] ->
    the down product's split-K partial sums [S, M, N] fp32 (`SplitKPartials`; S = split_k2 after
    rounding each split to whole block_k2 blocks). flags: `fused_mlp_flags` of x's device.
    one_launch None: one launch on a GPU, two (no counters) in Triton's interpreter."""
    m, k = x.shape
    n2, inter = down_weight.shape
    if m > FUSED_MLP_MAX_M or m < 1:
        raise ValueError(f"fused_mlp takes 1 to {FUSED_MLP_MAX_M} rows, got {m}")
    if gate_up_weight.shape != (2 * inter, k):
        raise ValueError(
            f"fused_mlp: gate|up weight {tuple(gate_up_weight.shape)} does not match x and the down weight"
        )
    if x.stride(1) != 1 or gate_up_weight.stride(1) != 1 or down_weight.stride(1) != 1:
        raise ValueError("fused_mlp expects unit stride on K")
    if flags.dtype != torch.int32 or flags.numel() < 2:
        raise ValueError("fused_mlp: flags must be fused_mlp_flags()")
    k2_per_split = triton.cdiv(triton.cdiv(inter, split_k2), block_k2) * block_k2
    splits = triton.cdiv(inter, k2_per_split)
    h = torch.empty((m, inter), dtype=x.dtype, device=x.device)
    part = torch.empty((splits, m, n2), dtype=torch.float32, device=x.device)
    if one_launch is None:
        one_launch = not _interpreted()
    if one_launch and x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        if num_programs > sms:
            raise ValueError(f"fused_mlp: {num_programs} programs cannot all be resident on {sms} SMs")
    prefetch = not _interpreted()  # inline PTX: not in the interpreter
    args = (
        x, gate_up_weight, down_weight, h, part, flags, m, inter, n2, k, x.stride(0), gate_up_weight.stride(0),
        down_weight.stride(0), h.stride(0), m * n2, k2_per_split, splits, num_programs,
    )  # fmt: skip
    consts = dict(
        BLOCK_M=16, BN1=block_n1, BK1=block_k1, BN2=block_n2, BK2=block_k2, NUM_STAGES=num_stages,
        PREFETCH1=prefetch1 if prefetch else 0, PREFETCH2=prefetch2 if prefetch else 0, num_warps=num_warps,
    )  # fmt: skip
    grid = (num_programs,)
    if one_launch:
        _fused_mlp_kernel[grid](*args, PHASE=0, **consts, **pdl.launch_kwargs())
    else:
        _fused_mlp_kernel[grid](*args, PHASE=1, **consts, **pdl.launch_kwargs())
        _fused_mlp_kernel[grid](*args, PHASE=2, **consts, **pdl.launch_kwargs())
    return part
