"""InfiniteVL model package: config, decoder, vision tower, loader and the tiny test checkpoint.

Public names are imported lazily so that `import model.config` stays light (no transformers import).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "model.config",
    "TextConfig": "model.config",
    "VisionConfig": "model.config",
    "load_config": "model.config",
    "parse_config": "model.config",
    "BatchMeta": "model.batch",
    "StateTensors": "model.state",
    "allocate_state": "model.state",
    "Backend": "model.backends",
    "TorchBackend": "model.backends",
    "get_backend": "model.backends",
    "InfiniteVLForCausalLM": "model.infinitevl",
    "load_model": "model.loader",
    "resolve_model_dir": "model.loader",
    "write_tiny_checkpoint": "model.tiny",
    "default_tiny_checkpoint_dir": "model.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
