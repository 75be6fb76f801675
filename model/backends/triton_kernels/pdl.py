"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of the decode path.

With PDL a kernel is launched while its predecessor still runs. Its programs call
`griddepcontrol.wait` before they read anything the predecessor writes (the wait returns once the
predecessor has finished and its writes are visible), and `griddepcontrol.launch_dependents` lets
their own successor launch. Two orders (`MODES`):
- "wait_first": wait, then let the successor launch: only the launch latency overlaps;
- "trigger_first": let the successor launch at once, then wait. A chain of small kernels is then
  resident ahead of time, and a GEMM behind them starts pulling its first weight tiles into L2 (reads
  of constant weights only, see `gemm.py`) while the kernels before it still run, when HBM idles.
Either order is safe: every kernel waits before its first dependent read and before its first write,
and a kernel completes only after its own wait returned, so completion is transitive down the chain.

Experimental: off unless INFINITEVL_PDL is "1"/"wait_first" or "trigger_first" (or `MODE` is set
before the kernels are launched or a graph is captured); measured by benchmarks/ab_decode.py.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MODES = ("off", "wait_first", "trigger_first")
_ENV = {"": "off", "0": "off", "1": "wait_first"}
MODE = _ENV.get(os.environ.get("INFINITEVL_PDL", ""), os.environ.get("INFINITEVL_PDL", ""))
if MODE not in MODES:
    raise ValueError(f"INFINITEVL_PDL={MODE!r}: choose 0, 1 or one of {MODES}")
# bytes of its first work unit's weight rows a GEMM program prefetches into L2 before its wait
# (trigger_first only; 0: none)
GEMM_PREFETCH_BYTES = int(os.environ.get("INFINITEVL_PDL_PREFETCH", "0"))


def launch_kwargs() -> dict:
    """Extra launch arguments of a PDL-aware kernel: its USE_PDL constexpr (0 off, 1 wait first,
    2 trigger first) and Triton's launch_pdl."""
    if MODE == "off":
        return {"USE_PDL": 0}
    return {"USE_PDL": MODES.index(MODE), "launch_pdl": True}


@triton.jit
def prologue(USE_PDL: tl.constexpr):
    """First statement of a PDL-aware kernel (before any read of a predecessor's output)."""
    if USE_PDL == 1:
        gdc_wait()
        gdc_launch_dependents()
    elif USE_PDL == 2:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def prefetch_l2(ptrs):
    """Fire-and-forget L2 prefetch of the 128-byte lines at `ptrs` (valid addresses: clamp, don't mask)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;",
        "=r,l",
        [ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
