"""Layout of the per-sequence state the model reads and writes (allocated by `cache.pool`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import TextConfig


@dataclass(frozen=True)
class StateTensors:
    """All per-slot state of the text decoder; row `num_slots` of every tensor is the dummy slot.

    recurrent: [num_gdn_layers, num_slots + 1, H, d_k, d_v]  state dtype (fp32 default), key-major S
    conv:      [num_gdn_layers, num_slots + 1, conv_dim, conv_size]  model dtype; the last conv_size
               pre-convolution inputs of the concatenated q|k|v stream, column conv_size-1 the newest
    key/value: [num_swa_layers, num_slots + 1, W, kv_heads, head_dim]  model dtype, post-RoPE; the key
               of absolute token index p lives at row p % W (a ring of the last W tokens)
    Layer i of the model uses index `gdn_index[i]` or `swa_index[i]` into the first dimension.
    """

    recurrent: torch.Tensor
    conv: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor

    @property
    def num_slots(self) -> int:
        """Live slots (the dummy row excluded)."""
        return self.recurrent.shape[1] - 1

    @property
    def dummy_slot(self) -> int:
        return self.recurrent.shape[1] - 1


@dataclass(frozen=True)
class StateShapes:
    recurrent: tuple[int, ...]  # per slot, per layer: (H, d_k, d_v)
    conv: tuple[int, ...]  # (conv_dim, conv_size)
    window: tuple[int, ...]  # (W, kv_heads, head_dim), keys and values each
    num_gdn_layers: int
    num_swa_layers: int

    def bytes_per_slot(self, state_dtype: torch.dtype, model_dtype: torch.dtype) -> int:
        """Device bytes one slot costs across all layers."""

        def numel(shape: tuple[int, ...]) -> int:
            n = 1
            for s in shape:
                n *= s
            return n

        s_item = torch.empty((), dtype=state_dtype).element_size()
        m_item = torch.empty((), dtype=model_dtype).element_size()
        gdn = self.num_gdn_layers * (numel(self.recurrent) * s_item + numel(self.conv) * m_item)
        swa = self.num_swa_layers * 2 * numel(self.window) * m_item
        return gdn + swa


def state_shapes(cfg: TextConfig) -> StateShapes:
    """Per-slot state shapes of a text config. Full-attention configs (no window) cannot be pooled."""
    if cfg.sliding_window is None:
        raise ValueError("the slot pool needs a sliding window; this config has full attention layers")
    return StateShapes(
        recurrent=(cfg.num_linear_heads, cfg.linear_head_dim, cfg.linear_value_dim),
        conv=(cfg.conv_dim, cfg.conv_size),
        window=(cfg.sliding_window, cfg.num_key_value_heads, cfg.head_dim),
        num_gdn_layers=len(cfg.gdn_layers),
        num_swa_layers=len(cfg.swa_layers),
    )


def allocate_state(
    cfg: TextConfig,
    num_slots: int,
    state_dtype: torch.dtype,
    model_dtype: torch.dtype,
    device: torch.device | str,
) -> StateTensors:
    """Zeroed state for `num_slots` slots plus the dummy slot."""
    sh = state_shapes(cfg)
    rows = num_slots + 1
    return StateTensors(
        recurrent=torch.zeros((sh.num_gdn_layers, rows, *sh.recurrent), dtype=state_dtype, device=device),
        conv=torch.zeros((sh.num_gdn_layers, rows, *sh.conv), dtype=model_dtype, device=device),
        key=torch.zeros((sh.num_swa_layers, rows, *sh.window), dtype=model_dtype, device=device),
        value=torch.zeros((sh.num_swa_layers, rows, *sh.window), dtype=model_dtype, device=device),
    )
