"""Shared helpers of the GPU tests: device choice and comparison against the torch backend.

GPU tests run on CUDA; with TRITON_INTERPRET=1 (and triton installed) the kernel tests also run in
Triton's CPU interpreter, which is how the kernels' index logic is checked without a GPU (Triton 3.6's
interpreter needs numpy < 2.3: newer numpy refuses its loop bounds, size-1 arrays, as Python ints).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs CUDA (or TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN propagates)."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
