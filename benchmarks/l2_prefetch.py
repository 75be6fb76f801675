"""L2 prefetch of weights on a side stream during decode (Hopper): the kernels of benchmarks/exp_l2_prefetch.py.

A decode step at small batch is a chain of GEMMs that stream weights from HBM with small, latency-bound
kernels between them (norms, conv, gates, the delta rule, attention over the window). HBM idles during
those kernels and during each GEMM's ramp-up and tail. A prefetch kernel forked onto a side stream
right after GEMM j pulls the head of GEMM j+1's weight into L2 while the small kernels run, so GEMM j+1
reads part of its weight from L2. It reads memory only: outputs are bit-identical with it on or off.

Three ways to pull bytes into L2 (`KINDS`), chosen by measurement (benchmarks/exp_l2_prefetch.py):
- "load": plain loads that bypass L1 (.cg) marked evict_last, xor-folded into a per-program sink;
- "line": the PTX `prefetch.global.L2::evict_last` per 128-byte line (no registers held);
- "bulk": the sm_90 `cp.async.bulk.prefetch.L2` of a whole 64 KiB chunk per instruction (TMA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KINDS = ("load", "line", "bulk")
LINE_BYTES = 128
BULK_CHUNK = 64 * 1024


@triton.jit
def _prefetch_load_kernel(ptr, n, sink, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(ptr + offs, mask=offs < n, other=0, cache_modifier=".cg", eviction_policy="evict_last")
    tl.store(sink + pid % 64, tl.xor_sum(acc, axis=0))


@triton.jit
def _prefetch_line_kernel(ptr, n_lines, sink, LINES: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * LINES
    acc = tl.zeros([LINES], dtype=tl.int32)
    for start in range(pid * LINES, n_lines, step):
        line = tl.minimum(start + tl.arange(0, LINES), n_lines - 1).to(tl.int64)
        acc |= tl.inline_asm_elementwise(
            "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;",
            "=r,l",
            [ptr + line * 128],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    tl.store(sink + pid % 64, tl.sum(acc, axis=0))


@triton.jit
def _prefetch_bulk_kernel(ptr, nbytes, sink, CHUNK: tl.constexpr, PER_PROG: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid * PER_PROG + tl.arange(0, PER_PROG)
    off = idx.to(tl.int64) * CHUNK
    last = ((nbytes - 1) // CHUNK) * CHUNK  # the last chunk's offset: chunks past the end repeat it
    off = tl.minimum(off, last)
    size = tl.minimum(nbytes - off, CHUNK).to(tl.int32)
    r = tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
        "=r,l,r",
        [ptr + off, size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
    tl.store(sink + pid % 64, tl.sum(r, axis=0))


class L2Prefetch:
    """Launches one prefetch of the first `nbytes` of a tensor into L2 with a fixed launch shape."""

    def __init__(self, kind: str, device: torch.device, programs: int, block: int = 2048) -> None:
        if kind not in KINDS:
            raise ValueError(f"prefetch kind {kind!r} not in {KINDS}")
        self.kind, self.programs, self.block = kind, programs, block
        self.sink = torch.zeros(64, dtype=torch.int32, device=device)  # never read

    def __call__(self, t: torch.Tensor, nbytes: int) -> None:
        flat = t.view(-1).view(torch.uint8)  # contiguous weights only (the caller checks)
        nbytes = min(nbytes, flat.numel()) // 16 * 16
        if nbytes <= 0:
            return
        if self.kind == "load":
            words = flat[:nbytes].view(torch.int32)
            _prefetch_load_kernel[(self.programs,)](words, words.numel(), self.sink, BLOCK=self.block)
        elif self.kind == "line":
            lines = triton.cdiv(nbytes, LINE_BYTES)
            _prefetch_line_kernel[(self.programs,)](flat, lines, self.sink, LINES=self.block // 8)
        else:
            chunks = triton.cdiv(nbytes, BULK_CHUNK)
            per_prog = 4
            grid = (triton.cdiv(chunks, per_prog),)
            _prefetch_bulk_kernel[grid](flat, nbytes, self.sink, CHUNK=BULK_CHUNK, PER_PROG=per_prog)
