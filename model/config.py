"""InfiniteVL configuration: parse a release `config.json` into frozen dataclasses.

Accepts the flat layout of the release (text fields at the top level, a `vision_config` object) and
the nested layout (a `text_config` object). Absent Gated DeltaNet fields take the reference class
defaults (spec section 2.2); `layer_types` follows the 1 SWA : 3 GDN rule unless given explicitly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
LINEAR = "linear_attention"


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """Spec 2.3: layer i is sliding-window attention when i % 4 == 0, else Gated DeltaNet."""
    return tuple(SLIDING if i % 4 == 0 else LINEAR for i in range(num_layers))


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 3584
    intermediate_size: int = 3420
    num_heads: int = 16
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    tokens_per_second: float = 4

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        d = dict(d)
        if "in_chans" in d and "in_channels" not in d:
            d["in_channels"] = d["in_chans"]
        if "spatial_patch_size" in d and "patch_size" not in d:
            d["patch_size"] = d["spatial_patch_size"]
        if "embed_dim" in d and "hidden_size" not in d:
            d["hidden_size"] = d["embed_dim"]
        kwargs = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "fullatt_block_indexes" in kwargs:
            kwargs["fullatt_block_indexes"] = tuple(kwargs["fullatt_block_indexes"])
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `Qwen2_5_VLVisionConfig`."""
        return {
            "depth": self.depth,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "hidden_act": self.hidden_act,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "window_size": self.window_size,
            "fullatt_block_indexes": list(self.fullatt_block_indexes),
            "out_hidden_size": self.out_hidden_size,
            "tokens_per_second": self.tokens_per_second,
        }


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    sliding_window: int | None = 8192
    tie_word_embeddings: bool = True
    layer_types: tuple[str, ...] = field(default_factory=lambda: default_layer_types(36))
    # Gated DeltaNet (absent from the release config: reference class defaults)
    num_linear_heads: int = 16
    num_linear_key_value_heads: int = 16
    linear_head_dim: int = 128
    expand_v: int = 2
    use_gate: bool = True
    use_short_conv: bool = True
    conv_size: int = 4
    norm_eps: float = 1e-5
    # token ids
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    torch_dtype: str = "bfloat16"

    @property
    def linear_value_dim(self) -> int:
        """GDN value head dim d_v = linear_head_dim * expand_v (256 in the release)."""
        return self.linear_head_dim * self.expand_v

    @property
    def swa_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t in (SLIDING, FULL))

    @property
    def gdn_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == LINEAR)

    @property
    def conv_dim(self) -> int:
        """Channels of the concatenated q, k, v short-convolution stream (8192 in the release)."""
        qk = self.num_linear_heads * self.linear_head_dim
        return 2 * qk + self.num_linear_heads * self.linear_value_dim


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    architectures: tuple[str, ...] = ("InfiniteVLQwen2_5_VLForConditionalGeneration",)
    model_type: str = "infinite_vl"


def _text_from_dict(d: dict[str, Any]) -> TextConfig:
    d = dict(d)
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if rope.get("type") == "mrope":
        rope["type"] = "default"
    if "mrope_section" in rope:
        d["mrope_section"] = tuple(rope["mrope_section"])
    if "rope_theta" not in d and "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    if d.get("use_sliding_window", True) is False:
        d["sliding_window"] = None
    num_layers = int(d.get("num_hidden_layers", 36))
    if d.get("layer_types"):
        d["layer_types"] = tuple(d["layer_types"])
        if len(d["layer_types"]) != num_layers:
            raise ValueError(f"layer_types has {len(d['layer_types'])} entries for {num_layers} layers")
    else:
        d["layer_types"] = default_layer_types(num_layers)
    if "head_dim" not in d or d["head_dim"] is None:
        d["head_dim"] = 128
    if "dtype" in d and "torch_dtype" not in d:
        d["torch_dtype"] = d["dtype"]
    kwargs = {k: d[k] for k in TextConfig.__dataclass_fields__ if k in d and d[k] is not None}
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    cfg = TextConfig(**kwargs)
    bad = [t for t in cfg.layer_types if t not in (SLIDING, FULL, LINEAR)]
    if bad:
        raise ValueError(f"unknown layer type {bad[0]!r} in layer_types")
    return cfg


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a config.json dict, flat (release) or nested (`text_config`)."""
    top = dict(raw)
    text_raw = dict(top)
    if isinstance(top.get("text_config"), dict):
        # nested layout: token ids may live at the top level; text_config wins where both exist
        text_raw.update(top["text_config"])
    text_raw.pop("vision_config", None)
    text_raw.pop("text_config", None)
    vision = VisionConfig.from_dict(top.get("vision_config") or {})
    return ModelConfig(
        text=_text_from_dict(text_raw),
        vision=vision,
        architectures=tuple(top.get("architectures") or ModelConfig.architectures),
        model_type=str(top.get("model_type", "infinite_vl")),
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `<model_dir>/config.json`."""
    path = Path(model_dir) / "config.json"
    with open(path, encoding="utf-8") as f:
        return parse_config(json.load(f))
