"""InfiniteVL vision tower: transformers' Qwen2.5-VL vision transformer (spec section 6).

The tower is class-for-class identical to `Qwen2_5_VisionTransformerPretrainedModel`, so we subclass it
(parameter names stay `patch_embed.*`, `blocks.{i}.*`, `merger.*` under the `visual.` prefix) and add
`encode`, which returns the merged tokens.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionRotaryEmbedding,
)

from model.config import VisionConfig


def hf_vision_config(cfg: VisionConfig, attn_implementation: str = "sdpa") -> Qwen2_5_VLVisionConfig:
    """transformers' vision config for our VisionConfig."""
    hf = Qwen2_5_VLVisionConfig(**cfg.to_hf_dict())
    hf._attn_implementation = attn_implementation
    return hf


class VisionTower(Qwen2_5_VisionTransformerPretrainedModel):
    """Qwen2.5-VL ViT + patch merger; `encode` gives [num_merged_tokens, out_hidden_size]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__(hf_vision_config(cfg))
        self.vision_config = cfg

    def reset_buffers(self) -> None:
        """Recompute the non-persistent rotary buffers (needed after building on the meta device)."""
        rope = self.rotary_pos_emb
        device = self.patch_embed.proj.weight.device
        inv_freq, _ = Qwen2_5_VLVisionRotaryEmbedding.compute_axial_rope_parameters(rope.config)
        rope.inv_freq = inv_freq.to(device)
        rope.original_inv_freq = inv_freq.clone().to(device)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged vision tokens of all entries, concatenated in entry order.

        pixel_values: [num_patches, C * temporal_patch * patch * patch] processor rows (any float dtype).
        grid_thw: [k, 3] int (t, h, w) in patch units per entry. Returns
        [sum(t * h * w) / merge**2, out_hidden_size] in the tower's dtype.
        """
        dtype = self.patch_embed.proj.weight.dtype
        device = self.patch_embed.proj.weight.device
        out = self(pixel_values.to(device=device, dtype=dtype), grid_thw.to(device))
        return out.pooler_output
