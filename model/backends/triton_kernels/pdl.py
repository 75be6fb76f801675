"""Programmatic dependent launch (PDL, Hopper and later) for the Triton kernels of the decode path.

With PDL a kernel is launched while its predecessor still runs: its programs start with
`griddepcontrol.wait` (nothing is read before the predecessor has finished and its writes are
visible) and then let their own successor launch, so the launch latency of each kernel overlaps the
previous one's tail instead of adding a gap. A kernel launched without PDL (cuBLAS, torch) waits for
its predecessor as usual, so a chain may mix both.

Only launches captured into a CUDA graph use it (the decode graphs): an eager launch with the PDL
attribute costs about twice the host time of a plain one (measured: an eager batch-1 decode step
15-18 ms plain, 30.5 ms with PDL), and eager paths (prefill chunks, vision) are host-bound. A graph's
warm-up pass runs inside `warmup()`, so that the PDL variants of the kernels are compiled and loaded
before the capture (Triton cannot load a module while a stream captures).

On where the GPU supports it (compute capability 9.0 or later), unless INFINITEVL_PDL=0;
INFINITEVL_PDL=1 forces it on. `ENABLED` may be set before a graph is captured
(benchmarks/ab_decode.py, the graph tests).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_ENV = os.environ.get("INFINITEVL_PDL")
ENABLED: bool | None = None if _ENV in (None, "") else _ENV == "1"  # None: decided on first launch
_warmups = 0  # open warmup() blocks


def supported() -> bool:
    """Whether the current CUDA device can launch with PDL (not in Triton's CPU interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 9


@contextmanager
def warmup() -> Iterator[None]:
    """Eager launches inside the block use PDL as a capture would (a graph's warm-up pass)."""
    global _warmups
    _warmups += 1
    try:
        yield
    finally:
        _warmups -= 1


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def launch_kwargs() -> dict:
    """Extra launch arguments of a PDL-aware kernel: its USE_PDL constexpr and Triton's launch_pdl
    (PDL while a CUDA graph is captured or inside `warmup()`)."""
    global ENABLED
    if ENABLED is None:
        ENABLED = supported()
    if ENABLED and (_warmups or capturing()):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def prologue(USE_PDL: tl.constexpr):
    """First statement of a PDL-aware kernel: wait for the previous kernel, then let the next launch."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
