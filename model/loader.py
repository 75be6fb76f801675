"""Load an InfiniteVL checkpoint (local directory or Hugging Face repo id) strictly into the model.

Accepts single-file and sharded safetensors, in the legacy layout (`model.layers.*`, `visual.*`) or
the new one (`model.language_model.*`, `model.visual.*`); names are normalised to the legacy layout,
which is the model's module layout. `lm_head.weight` is optional and ignored (logits are tied).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from model.backends import get_backend
from model.config import load_config
from model.infinitevl import InfiniteVLForCausalLM

IGNORED_TENSORS = frozenset({"lm_head.weight"})
_PROGRESS_MIN_TENSORS = 2000  # show a progress bar only for checkpoints at least this large
_PROGRESS_MIN_SHARDS = 2


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id resolved through huggingface_hub.

    Works offline (`HF_HUB_OFFLINE=1`) when the repo is already in the local cache.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is neither a directory nor a Hugging Face repo id"
        )
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.py"]
        return Path(snapshot_download(repo_id=str(name_or_path), allow_patterns=patterns))
    except Exception as exc:
        raise FileNotFoundError(
            f"could not resolve model {str(name_or_path)!r}: not a local directory, and the Hugging Face "
            f"download/cache lookup failed ({type(exc).__name__}: {exc})"
        ) from exc


def normalise_name(name: str) -> str:
    """Map new-layout names onto the legacy layout (`model.language_model.x` -> `model.x`, etc.)."""
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return re.sub(r"^model\.language_model\.", "model.", name)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards of the index, or `model.safetensors`."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    return found


def _checkpoint_index(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """normalised name -> (file, name on disk, shape), reading only the headers."""
    index: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = normalise_name(key)
                if name in index:
                    raise ValueError(f"tensor {name!r} appears twice in the checkpoint (as {key!r})")
                index[name] = (path, key, tuple(f.get_slice(key).get_shape()))
    return index


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming the first missing, unexpected or wrong-shaped tensor."""
    for name in sorted(found):
        if name not in expected and name not in IGNORED_TENSORS:
            raise ValueError(f"unexpected tensor {name!r} in the checkpoint")
    for name in sorted(expected):
        if name not in found:
            raise ValueError(f"missing tensor {name!r} in the checkpoint")
        if tuple(found[name]) != tuple(expected[name]):
            raise ValueError(
                f"tensor {name!r} has shape {list(found[name])} in the checkpoint, model expects "
                f"{list(expected[name])}"
            )


def _progress(total: int, num_files: int):  # -> tqdm or None
    if total < _PROGRESS_MIN_TENSORS and num_files < _PROGRESS_MIN_SHARDS:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="loading weights", unit="tensor")


def _iter_tensors(index: dict[str, tuple[Path, str, tuple[int, ...]]]) -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (path, key, _) in index.items():
        by_file.setdefault(path, []).append((name, key))
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name, key in names:
                yield name, f.get_tensor(key)


def load_weights(model: InfiniteVLForCausalLM, model_dir: Path) -> None:
    """Copy every checkpoint tensor into the (materialised) model, strictly."""
    params = dict(model.named_parameters())
    files = checkpoint_files(model_dir)
    index = _checkpoint_index(files)
    check_tensors({n: tuple(p.shape) for n, p in params.items()}, {n: e[2] for n, e in index.items()})
    bar = _progress(len(index), len(files))
    with torch.no_grad():
        for name, tensor in _iter_tensors(index):
            if name not in IGNORED_TENSORS:
                params[name].copy_(tensor)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | str = "cpu") -> torch.dtype:
    """A torch dtype from a dtype or a name; "auto" is bf16 on CUDA and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def load_model(
    model_dir: str | Path,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> InfiniteVLForCausalLM:
    """Build the model on the meta device, materialise it on `device` in `dtype`, load weights strictly."""
    model_dir = resolve_model_dir(model_dir)
    config = load_config(model_dir)
    device = torch.device(device)
    kernels = get_backend(backend, device)
    with torch.device("meta"):
        model = InfiniteVLForCausalLM(config, kernels)
    model = model.to(dtype=resolve_dtype(dtype, device)).to_empty(device=device)
    load_weights(model, model_dir)
    model.fuse_projections()  # after loading: the checkpoint-named Linears become views of fused GEMMs
    model.visual.reset_buffers()
    return model.eval().requires_grad_(False)
