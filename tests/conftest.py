"""Shared fixtures: the tiny InfiniteVL checkpoint (generated once per session) and its fp32 model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly written tiny checkpoint directory (seed 0), shared by the whole session."""
    from model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt_dir: Path):
    """The tiny model in fp32 on CPU with the torch backend. Do not modify its parameters."""
    import torch

    from model.loader import load_model

    return load_model(tiny_ckpt_dir, dtype=torch.float32, device="cpu", backend="torch")
