"""InfiniteVL vision tower: transformers' Qwen2.5-VL vision transformer (spec section 6).

The tower is class-for-class identical to `Qwen2_5_VisionTransformerPretrainedModel`, so we subclass it
(parameter names stay `patch_embed.*`, `blocks.{i}.*`, `merger.*` under the `visual.` prefix) and add
`encode`, which returns the merged tokens.

Four things differ from the stock forward, all for speed on the GPU, none in the result beyond
reduction order:
- every block's attention is a `SegmentAttention`: transformers' SDPA path runs one SDPA call per window
  (16 windows x 28 windowed layers per 448x448 frame) and reads `cu_seqlens` back to the host in every
  layer; ours runs one batched SDPA call per distinct segment length (one call in the common case of
  equal windows) from segment lengths known on the host.
- `encode` derives everything the forward needs from `grid_thw` on the host (rotary positions, window
  order, `cu_seqlens`, the segment groups), caches it per grid, and hands it to the forward through
  transformers' precomputed-kwargs mechanism, so that the forward never reads the device.
- given the backend's fused elementwise ops (`PointwiseOps`), a block runs its RMSNorms (the second one
  with the residual add), the rotary embedding and the MLP's silu * up as one kernel each, where the
  stock code runs several fp32 elementwise kernels per step; the roundings are the stock code's.
- the patch embedding runs as a GEMM (`PatchEmbed`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionPatchEmbed,
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLMLP,
    Qwen2_5_VLVisionAttention,
    Qwen2_5_VLVisionBlock,
    Qwen2_5_VLVisionRotaryEmbedding,
    apply_rotary_pos_emb_vision,
)
from transformers.utils.generic import is_flash_attention_requested
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from model.backends.base import PointwiseOps
from model.batch import upload
from model.config import VisionConfig

MAX_CACHED_LAYOUTS = 32  # distinct grids whose layouts `encode` keeps on the device


def hf_vision_config(cfg: VisionConfig, attn_implementation: str = "sdpa") -> Qwen2_5_VLVisionConfig:
    """transformers' vision config for our VisionConfig."""
    hf = Qwen2_5_VLVisionConfig(**cfg.to_hf_dict())
    hf._attn_implementation = attn_implementation
    return hf


@dataclass(frozen=True)
class SegmentGroup:
    """The attention segments of one length: `num_segments` runs of `seq_len` consecutive rows."""

    seq_len: int
    num_segments: int
    rows: Tensor | None  # [num_segments * seq_len] int64 row indices, segment-major; None: all rows in order


def segment_groups(seq_lens: list[int], device: torch.device) -> tuple[SegmentGroup, ...]:
    """Segments (given by their lengths, in row order) grouped by length, groups in first-seen order."""
    starts: dict[int, list[int]] = {}  # length -> first rows of its segments
    start = 0
    for seq_len in seq_lens:
        if seq_len > 0:
            starts.setdefault(seq_len, []).append(start)
        start += seq_len
    if len(starts) == 1:
        ((seq_len, firsts),) = starts.items()
        return (SegmentGroup(seq_len, len(firsts), None),)
    groups = []
    for seq_len, firsts in starts.items():
        rows = (torch.tensor(firsts)[:, None] + torch.arange(seq_len)).reshape(-1)
        groups.append(SegmentGroup(seq_len, len(firsts), upload(rows, device)))
    return tuple(groups)


def _seq_lens(cu_seqlens: Tensor) -> list[int]:
    """Segment lengths of a host `cu_seqlens`."""
    return torch.diff(cu_seqlens.to(torch.int64)).tolist()


@dataclass(frozen=True)
class VisionLayout:
    """What the tower's forward derives from `grid_thw`, computed on the host once per grid.

    Tensors live on the tower's device. The two `cu_seqlens` tensors identify which segment groups an
    attention call uses: the tower only ever passes these two objects to its blocks.
    """

    position_ids: Tensor  # [num_patches, 2] int64 (h, w) rotary positions in processor row order
    window_index: Tensor  # [num_patches / merge**2] int64 merge units in window order
    cu_seqlens: Tensor  # [num_temporal_patches + 1] int32 full attention: one segment per temporal patch
    cu_window_seqlens: Tensor  # [num_windows + 1] int32 window attention, in window order
    max_seqlen: int
    max_window_seqlen: int
    full_groups: tuple[SegmentGroup, ...]
    window_groups: tuple[SegmentGroup, ...]

    @classmethod
    def build(
        cls, grid: Tensor, merge: int, window_size: int, patch_size: int, device: torch.device
    ) -> VisionLayout:
        """The layout of host `grid` [k, 3] (t, h, w), computed by transformers' own helpers."""
        position_ids = get_vision_position_ids(grid, merge)
        cu_seqlens = get_vision_cu_seqlens(grid)
        window_index, cu_window_seqlens = get_vision_window_index(
            grid, spatial_merge_size=merge, window_size=window_size, patch_size=patch_size
        )
        full_lens, window_lens = _seq_lens(cu_seqlens), _seq_lens(cu_window_seqlens)
        return cls(
            position_ids=upload(position_ids, device),
            window_index=upload(window_index, device),
            cu_seqlens=upload(cu_seqlens, device),
            cu_window_seqlens=upload(cu_window_seqlens, device),
            max_seqlen=max(full_lens),
            max_window_seqlen=max(window_lens),
            full_groups=segment_groups(full_lens, device),
            window_groups=segment_groups(window_lens, device),
        )

    def groups_for(self, cu_seqlens: Tensor) -> tuple[SegmentGroup, ...] | None:
        """The segment groups of one of this layout's `cu_seqlens` objects; None for any other tensor."""
        if cu_seqlens is self.cu_seqlens:
            return self.full_groups
        if cu_seqlens is self.cu_window_seqlens:
            return self.window_groups
        return None

    def forward_kwargs(self) -> dict[str, Any]:
        """Precomputed values under the keys the stock forward pops instead of computing them."""
        return {
            "position_ids": self.position_ids,
            "window_index": self.window_index,
            "cu_window_seqlens": self.cu_window_seqlens,
            "cu_seqlens": self.cu_seqlens,
            "max_seqlen": self.max_seqlen,
            "max_window_seqlen": self.max_window_seqlen,
        }


class ActiveEncode:
    """What the `encode` call in progress runs with (None outside one), shared by the tower and its
    blocks: the grid's layout and the backend's fused elementwise ops (None: the stock code)."""

    def __init__(self) -> None:
        self.layout: VisionLayout | None = None
        self.pointwise: PointwiseOps | None = None


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, groups: tuple[SegmentGroup, ...], scale: float, dropout_p: float = 0.0
) -> Tensor:
    """Bidirectional attention within each segment: one SDPA call per group. q, k, v, out: [N, heads, dim]."""

    def run(qs: Tensor, ks: Tensor, vs: Tensor, g: SegmentGroup) -> Tensor:
        heads, dim = qs.shape[1:]
        qs, ks, vs = (x.view(g.num_segments, g.seq_len, heads, dim).transpose(1, 2) for x in (qs, ks, vs))
        out = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2).reshape(g.num_segments * g.seq_len, heads, dim)

    if len(groups) == 1 and groups[0].rows is None:
        return run(q, k, v, groups[0])
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    for g in groups:
        out.index_copy_(0, g.rows, run(q[g.rows], k[g.rows], v[g.rows], g))
    return out


class SegmentAttention(Qwen2_5_VLVisionAttention):
    """Qwen2.5-VL vision attention (same `qkv` and `proj` parameters) with one SDPA call per segment length.

    Segment lengths come from the active `encode` layout when `cu_seqlens` is one of its tensors, else
    from reading `cu_seqlens` back (a device sync; only direct calls of the tower's forward take it).
    Flash attention implementations keep the stock varlen path.
    """

    def __init__(self, config: Qwen2_5_VLVisionConfig, active: ActiveEncode) -> None:
        super().__init__(config)
        self.active = active

    def segment_groups(self, cu_seqlens: Tensor) -> tuple[SegmentGroup, ...]:
        layout = self.active.layout
        groups = None if layout is None else layout.groups_for(cu_seqlens)
        if groups is None:
            groups = segment_groups(_seq_lens(cu_seqlens.cpu()), cu_seqlens.device)
        return groups

    def forward(
        self,
        hidden_states: Tensor,
        cu_seqlens: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if is_flash_attention_requested(self.config):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq_len = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).view(seq_len, 3, self.num_heads, -1)
        cos, sin = position_embeddings
        ops = self.active.pointwise
        if ops is None:
            q, k = apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], cos, sin)
        else:  # q and k heads rotated together, in place: [N, 2 heads, head_dim] rows of stride 3 * hidden
            ops.vision_rope(qkv.view(seq_len, 3 * self.num_heads, -1)[:, : 2 * self.num_heads], cos, sin)
            q, k = qkv[:, 0], qkv[:, 1]
        v = qkv[:, 2]
        dropout_p = self.attention_dropout if self.training else 0.0
        out = segment_attention(q, k, v, self.segment_groups(cu_seqlens), self.scaling, dropout_p)
        return self.proj(out.reshape(seq_len, -1))


class AlignedMLP(Qwen2_5_VLMLP):
    """The tower's SwiGLU MLP. After `fuse_projections()` gate|up run as one GEMM and the intermediate
    width is zero-padded to a multiple of 8 (3420 -> 3424 in the release): an unaligned width sends
    cuBLAS to slow fallback kernels. Exact: padded gate/up outputs are 0, silu(0) * 0 = 0, and the
    padded down columns are 0. The checkpoint-named Linears keep their shapes as views of the padded
    tensors (no second copy); call it again after `.to()`."""

    def __init__(self, config: Qwen2_5_VLVisionConfig, active: ActiveEncode) -> None:
        super().__init__(config, bias=True)
        self.active = active
        self.silu = config.hidden_act == "silu"  # the fused silu * up applies
        self.register_buffer("gate_up_weight", None, persistent=False)  # [2 * padded, hidden]
        self.register_buffer("gate_up_bias", None, persistent=False)
        self.register_buffer("down_weight", None, persistent=False)  # [hidden, padded]

    @torch.no_grad()
    def fuse_projections(self) -> None:
        w = self.gate_proj.weight
        if self.gate_up_weight is not None and w.data_ptr() == self.gate_up_weight.data_ptr():
            return
        inter, hidden = w.shape
        padded = -(-inter // 8) * 8
        gate_up = w.new_zeros(2 * padded, hidden)
        gate_up_bias = w.new_zeros(2 * padded)
        down = w.new_zeros(hidden, padded)
        for i, lin in enumerate((self.gate_proj, self.up_proj)):
            rows = slice(i * padded, i * padded + inter)
            gate_up[rows] = lin.weight
            gate_up_bias[rows] = lin.bias
            lin.weight = nn.Parameter(gate_up[rows], requires_grad=False)
            lin.bias = nn.Parameter(gate_up_bias[rows], requires_grad=False)
        down[:, :inter] = self.down_proj.weight
        self.down_proj.weight = nn.Parameter(down[:, :inter], requires_grad=False)
        self.gate_up_weight, self.gate_up_bias, self.down_weight = gate_up, gate_up_bias, down

    def forward(self, hidden_state: Tensor) -> Tensor:
        if self.gate_up_weight is None:
            return super().forward(hidden_state)
        gate_up = F.linear(hidden_state, self.gate_up_weight, self.gate_up_bias)  # [N, 2 * padded]
        ops = self.active.pointwise
        if ops is not None and self.silu:
            act = ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = self.act_fn(gate) * up
        return F.linear(act, self.down_weight, self.down_proj.bias)


class VisionBlock(Qwen2_5_VLVisionBlock):
    """The stock block (same `norm1`, `attn`, `norm2`, `mlp` names) with a `SegmentAttention` and an
    `AlignedMLP`; with the backend's fused ops, each RMSNorm is one kernel and the second one also
    does the residual add (same roundings: the add rounds to the model dtype, then the norm)."""

    def __init__(self, config: Qwen2_5_VLVisionConfig, active: ActiveEncode) -> None:
        super().__init__(config)
        self.active = active
        self.attn = SegmentAttention(config, active)
        self.mlp = AlignedMLP(config, active)

    def forward(
        self,
        hidden_states: Tensor,
        cu_seqlens: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        ops = self.active.pointwise
        if ops is None:
            return super().forward(hidden_states, cu_seqlens, position_embeddings, **kwargs)
        x, _ = ops.rms_norm(hidden_states, self.norm1.weight, self.norm1.variance_epsilon)
        attn = self.attn(x, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        x, hidden_states = ops.rms_norm(attn, self.norm2.weight, self.norm2.variance_epsilon, hidden_states)
        return hidden_states + self.mlp(x)


class PatchEmbed(Qwen2_5_VisionPatchEmbed):
    """The stock patch embedding (a Conv3d whose stride equals its kernel, no bias, parameter
    `proj.weight`) computed as the GEMM it is: each processor row is one patch, so the convolution is
    rows @ weight.view(embed_dim, -1).T (cuDNN's Conv3d path for it is a slow implicit GEMM)."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        weight = self.proj.weight
        rows = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
        return F.linear(rows, weight.view(self.embed_dim, -1), self.proj.bias)


class VisionTower(Qwen2_5_VisionTransformerPretrainedModel):
    """Qwen2.5-VL ViT + patch merger; `encode` gives [num_merged_tokens, out_hidden_size]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__(hf_vision_config(cfg))
        self.vision_config = cfg
        self.active = ActiveEncode()
        # grid rows (t, h, w) -> layout on the tower's device, least recently used first
        self.layouts: OrderedDict[tuple[tuple[int, int, int], ...], VisionLayout] = OrderedDict()
        stock_embed = self.patch_embed
        self.patch_embed = PatchEmbed(
            stock_embed.patch_size,
            stock_embed.temporal_patch_size,
            stock_embed.in_channels,
            stock_embed.embed_dim,
        )
        self.patch_embed.proj = stock_embed.proj
        # our blocks in place of the stock ones, on the stock blocks' parameters as built
        blocks = []
        for stock in self.blocks:
            block = VisionBlock(self.config, self.active)
            block.norm1, block.norm2 = stock.norm1, stock.norm2
            block.attn.qkv, block.attn.proj = stock.attn.qkv, stock.attn.proj
            mlp = block.mlp
            mlp.gate_proj, mlp.up_proj, mlp.down_proj = (
                stock.mlp.gate_proj,
                stock.mlp.up_proj,
                stock.mlp.down_proj,
            )
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)

    def fuse_projections(self) -> None:
        """Pad and fuse every block's MLP (see `AlignedMLP`); idempotent."""
        for block in self.blocks:
            block.mlp.fuse_projections()

    def reset_buffers(self) -> None:
        """Recompute the non-persistent rotary buffers (needed after building on the meta device)."""
        rope = self.rotary_pos_emb
        device = self.patch_embed.proj.weight.device
        inv_freq, _ = Qwen2_5_VLVisionRotaryEmbedding.compute_axial_rope_parameters(rope.config)
        rope.inv_freq = inv_freq.to(device)
        rope.original_inv_freq = inv_freq.clone().to(device)
        self.layouts.clear()

    def layout(self, grid_thw: Tensor) -> VisionLayout:
        """The (cached) layout of `grid_thw` [k, 3]; reads a device grid back once."""
        grid = grid_thw.to("cpu", torch.int64)
        key = tuple((t, h, w) for t, h, w in grid.tolist())
        device = self.patch_embed.proj.weight.device
        layout = self.layouts.get(key)
        if layout is None or layout.cu_seqlens.device != device:
            layout = VisionLayout.build(
                grid, self.spatial_merge_size, self.window_size, self.patch_size, device
            )
        self.layouts[key] = layout
        self.layouts.move_to_end(key)
        while len(self.layouts) > MAX_CACHED_LAYOUTS:
            self.layouts.popitem(last=False)
        return layout

    @torch.no_grad()
    def encode(self, pixel_values: Tensor, grid_thw: Tensor, pointwise: PointwiseOps | None = None) -> Tensor:
        """Merged vision tokens of all entries, concatenated in entry order.

        pixel_values: [num_patches, C * temporal_patch * patch * patch] processor rows (any float dtype).
        grid_thw: [k, 3] int (t, h, w) in patch units per entry; a host tensor avoids one device sync.
        pointwise: the backend's fused elementwise ops for the blocks (None: transformers' code).
        Returns [sum(t * h * w) / merge**2, out_hidden_size] in the tower's dtype.
        """
        weight = self.patch_embed.proj.weight
        layout = self.layout(grid_thw)
        self.active.layout, self.active.pointwise = layout, pointwise
        try:
            pixels = pixel_values.to(device=weight.device, dtype=weight.dtype)
            out = self(pixels, grid_thw, **layout.forward_kwargs())  # grid_thw itself goes unread
        finally:
            self.active.layout, self.active.pointwise = None, None
        return out.pooler_output
