"""Kernel backends behind one switch: `get_backend("torch" | "triton" | "auto", device)`."""

from __future__ import annotations

import importlib

import torch

from model.backends.base import Backend
from model.backends.torch_backend import TorchBackend

__all__ = ["Backend", "TorchBackend", "get_backend"]


def _triton_backend(device: torch.device) -> Backend:
    module = importlib.import_module("model.backends.triton_backend")
    return module.TritonBackend(device)


def get_backend(name: str, device: torch.device | str = "cpu") -> Backend:
    """Return the backend called `name` for `device`.

    "torch" always works. "triton" needs CUDA and `model.backends.triton_backend`. "auto" picks
    triton on a CUDA device when that module imports, else torch.
    """
    device = torch.device(device)
    if name == "torch":
        return TorchBackend(device)
    if name == "triton":
        return _triton_backend(device)  # raises on a device it cannot serve
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_available():
            try:
                return _triton_backend(device)
            except ImportError:
                pass
        return TorchBackend(device)
    raise ValueError(f"unknown backend {name!r}; expected 'torch', 'triton' or 'auto'")
