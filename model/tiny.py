"""The tiny test checkpoint: the real InfiniteVL architecture at a toy shape with seeded random weights.

`write_tiny_checkpoint(out_dir, seed)` writes a complete Hugging Face-style directory (tokenizer and
processor files from `model.tokenizer_builder`, a flat release-style `config.json`,
`generation_config.json`, `model.safetensors` in bf16 under the legacy names, no `lm_head.weight`).
The same seed gives byte-identical files. `default_tiny_checkpoint_dir()` caches one on disk.

Weights use fan-in scaled normals (std 1/sqrt(fan_in)) rather than initializer_range 0.02: with
0.02 every layer's contribution is tiny next to the embedding and greedy decoding just repeats the
input token. Gate parameters follow the usual Gated DeltaNet initialisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model.config import ModelConfig, parse_config

TINY_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": 64,
    "hidden_act": "silu",
    "in_chans": 3,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "out_hidden_size": 64,
    "tokens_per_second": 2,
    "model_type": "infinite_vl",
}


def tiny_config_dict(token_ids: dict[str, int]) -> dict[str, Any]:
    """The flat release-layout config.json of the tiny model (spec 2.1 field names)."""
    return {
        "architectures": ["InfiniteVLQwen2_5_VLForConditionalGeneration"],
        "model_type": "infinite_vl",
        "attn_implementation": "flash_attention_2",
        "torch_dtype": "bfloat16",
        "vocab_size": int(token_ids["vocab_size"]),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [2, 3, 3]},
        "max_position_embeddings": 128000,
        "use_sliding_window": True,
        "sliding_window": 16,
        "max_window_layers": 70,
        "tie_word_embeddings": True,
        "use_cache": False,
        "num_linear_heads": 2,
        "num_linear_key_value_heads": 2,
        "linear_head_dim": 16,
        "expand_v": 2,
        "use_gate": True,
        "use_short_conv": True,
        "conv_size": 4,
        "norm_eps": 1e-5,
        "bos_token_id": int(token_ids["bos_token_id"]),
        "eos_token_id": int(token_ids["eos_token_id"]),
        "pad_token_id": int(token_ids["pad_token_id"]),
        "image_token_id": int(token_ids["image_token_id"]),
        "video_token_id": int(token_ids["video_token_id"]),
        "vision_start_token_id": int(token_ids["vision_start_token_id"]),
        "vision_end_token_id": int(token_ids["vision_end_token_id"]),
        "vision_token_id": int(token_ids["vision_token_id"]),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "vision_config": dict(TINY_VISION),
    }


def generation_config_dict(token_ids: dict[str, int]) -> dict[str, Any]:
    """generation_config.json: stop on <|im_end|> and <|endoftext|> (spec 7.5)."""
    eos = [int(token_ids["eos_token_id"])]
    if int(token_ids["pad_token_id"]) not in eos:
        eos.append(int(token_ids["pad_token_id"]))
    return {
        "bos_token_id": int(token_ids["bos_token_id"]),
        "eos_token_id": eos,
        "pad_token_id": int(token_ids["pad_token_id"]),
    }


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Legacy checkpoint name -> shape for every parameter of the model (built on the meta device)."""
    from model.backends.torch_backend import TorchBackend
    from model.infinitevl import InfiniteVLForCausalLM

    with torch.device("meta"):
        model = InfiniteVLForCausalLM(config, TorchBackend("cpu"))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _is_norm_weight(name: str) -> bool:
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    return leaf.endswith("norm") or leaf in ("norm1", "norm2", "ln_q")


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """One seeded random tensor (fp32) for parameter `name`."""
    if name.endswith("A_log"):
        return torch.log(torch.empty(shape).uniform_(1.0, 16.0, generator=gen))
    if name.endswith("dt_bias"):
        log_dt = torch.empty(shape).uniform_(math.log(1e-3), math.log(1e-1), generator=gen)
        dt = torch.exp(log_dt).clamp(min=1e-4)
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if _is_norm_weight(name):
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    if name == "model.embed_tokens.weight":
        return 0.1 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def tiny_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded bf16 weights for every parameter, generated in sorted-name order."""
    gen = torch.Generator().manual_seed(seed)
    shapes = parameter_shapes(config)
    return {name: _init_tensor(name, shapes[name], gen).to(torch.bfloat16) for name in sorted(shapes)}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tiny_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    """Write the complete tiny checkpoint directory into `out_dir` (created if needed); returns it."""
    from model.tokenizer_builder import write_tokenizer_files

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    token_ids = write_tokenizer_files(out_dir, seed)
    config = tiny_config_dict(token_ids)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation_config_dict(token_ids))
    weights = tiny_weights(parse_config(config), seed)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


# ---------------------------------------------------------------------------------------------------
# On-disk cache


def _code_fingerprint() -> str:
    """Hash of the code that determines the checkpoint's bytes: a change regenerates the cache."""
    from model import tokenizer_builder

    digest = hashlib.sha256()
    for path in (Path(__file__), Path(tokenizer_builder.__file__)):
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()


def default_tiny_checkpoint_dir(seed: int = 0) -> Path:
    """The cached tiny checkpoint `$INFINITEVL_CACHE/tiny-seed{seed}` (default root ~/.cache/infinitevl).

    Generated on first use (and again when the generating code changed) into a temporary directory
    that is then renamed into place, so concurrent users never see a half-written checkpoint.
    """
    root = Path(os.environ.get("INFINITEVL_CACHE") or Path.home() / ".cache" / "infinitevl").expanduser()
    final = root / f"tiny-seed{seed}"
    marker = final / ".complete"
    fingerprint = _code_fingerprint()
    if marker.exists() and marker.read_text(encoding="utf-8") == fingerprint:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-seed{seed}-", dir=root))
    write_tiny_checkpoint(tmp, seed)
    (tmp / ".complete").write_text(fingerprint, encoding="utf-8")
    if final.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".stale-tiny-seed{seed}-", dir=root))
        with contextlib.suppress(OSError):  # another process may have replaced it first
            final.rename(stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is identical
    return final
