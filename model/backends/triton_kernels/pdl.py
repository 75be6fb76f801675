"""Programmatic dependent launch (PDL, Hopper and later) for the small kernels of the decode path.

With PDL a kernel is launched while its predecessor still runs: its programs start with
`griddepcontrol.wait` (nothing is read before the predecessor has finished and its writes are
visible) and then let their own successor launch, so the launch latency of each kernel overlaps the
previous one's tail instead of adding a gap. Experimental: off unless INFINITEVL_PDL=1 (or `ENABLED`
is set before the kernels are launched or a graph is captured); measured by benchmarks/ab_decode.py.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = os.environ.get("INFINITEVL_PDL") == "1"


def launch_kwargs() -> dict:
    """Extra launch arguments of a PDL-aware kernel: its USE_PDL constexpr and Triton's launch_pdl."""
    return {"USE_PDL": True, "launch_pdl": True} if ENABLED else {"USE_PDL": False}


@triton.jit
def prologue(USE_PDL: tl.constexpr):
    """First statement of a PDL-aware kernel: wait for the previous kernel, then let the next launch."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
