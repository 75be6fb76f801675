"""Vision tower on the tiny checkpoint: merged-token counts, injection at the pad positions, and the batched
segment attention against transformers' stock per-segment loop."""

from __future__ import annotations

import pytest
import torch
from model_helpers import new_state, text_positions
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionAttention,
)

import model.vision as vision
from model.batch import BatchMeta
from model.vision import SegmentAttention, hf_vision_config, segment_groups

PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch * patch * patch


def _pixels(grid: list[list[int]], seed: int = 0) -> torch.Tensor:
    rows = sum(t * h * w for t, h, w in grid)
    return torch.randn(rows, PATCH_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grid", [[[1, 4, 6]], [[2, 4, 4]], [[1, 4, 6], [2, 4, 4], [1, 10, 12]]])
@torch.no_grad()
def test_vision_output_count_is_thw_over_4(tiny_model, grid):
    feats = tiny_model.encode_vision(_pixels(grid), torch.tensor(grid))
    expected = sum(t * h * w for t, h, w in grid) // 4
    assert feats.shape == (expected, tiny_model.config.text.hidden_size)
    assert feats.dtype == tiny_model.dtype and torch.isfinite(feats).all()


@torch.no_grad()
def test_entries_are_encoded_independently(tiny_model):
    """Two entries in one call equal each encoded alone, concatenated in entry order."""
    grid = [[1, 4, 6], [1, 6, 4]]
    px = _pixels(grid, seed=1)
    both = tiny_model.encode_vision(px, torch.tensor(grid))
    first = tiny_model.encode_vision(px[:24], torch.tensor(grid[:1]))
    second = tiny_model.encode_vision(px[24:], torch.tensor(grid[1:]))
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_features_land_at_pad_positions(tiny_model):
    cfg = tiny_model.config.text
    img = tiny_model.encode_vision(_pixels([[1, 4, 6]]), torch.tensor([[1, 4, 6]]))  # 6 tokens
    vid = tiny_model.encode_vision(_pixels([[2, 4, 4]], 2), torch.tensor([[2, 4, 4]]))  # 8 tokens
    ids = torch.tensor(
        [5, cfg.vision_start_token_id, *[cfg.image_token_id] * 6, cfg.vision_end_token_id, 7]
        + [cfg.vision_start_token_id, *[cfg.video_token_id] * 8, cfg.vision_end_token_id, 9]
    )
    embeds = tiny_model.embed_multimodal(ids, image_features=img, video_features=vid)
    plain = tiny_model.embed(ids)
    is_img, is_vid = ids == cfg.image_token_id, ids == cfg.video_token_id
    torch.testing.assert_close(embeds[is_img], img, atol=0, rtol=0)
    torch.testing.assert_close(embeds[is_vid], vid, atol=0, rtol=0)
    torch.testing.assert_close(embeds[~(is_img | is_vid)], plain[~(is_img | is_vid)], atol=0, rtol=0)

    # the forward uses the injected embeddings: output differs from the text-only run at and after the pads
    n = ids.numel()
    meta = BatchMeta.build([0], [n], [0])
    with_vision = tiny_model(ids, text_positions(0, n), meta, new_state(tiny_model), inputs_embeds=embeds)
    text_only = tiny_model(ids, text_positions(0, n), meta, new_state(tiny_model))
    torch.testing.assert_close(with_vision[:2], text_only[:2], atol=0, rtol=0)
    assert (with_vision[2] - text_only[2]).abs().max() > 1e-3


def test_feature_count_must_match_placeholders(tiny_model):
    cfg = tiny_model.config.text
    ids = torch.tensor([cfg.image_token_id] * 3)
    with pytest.raises(ValueError, match="3 image placeholder tokens but 2"):
        tiny_model.embed_multimodal(ids, image_features=torch.zeros(2, cfg.hidden_size))
    with pytest.raises(ValueError, match="image"):
        tiny_model.embed_multimodal(ids)


# ---------------------------------------------------------------------------------------------------
# batched segment attention vs transformers' per-segment SDPA loop

GRIDS = {
    # several images with edge windows: window lengths 24, 64, 32, 16, 8, 4; full segments 24, 120, 180
    "images": [[1, 4, 6], [1, 10, 12], [1, 18, 10]],
    # a video: 3 temporal patches of 16 x 20 patches, windows of 64 and 32 rows, 3 full segments of 320
    "video": [[3, 16, 20]],
    # one image, all 4 windows of 64 rows
    "image": [[1, 16, 16]],
    # images and a video in one call: equal lengths that are not neighbours (24 and 64 rows, twice each)
    "mixed": [[1, 4, 6], [2, 8, 8], [1, 6, 4]],
}


@pytest.fixture(scope="module")
def stock_tower(tiny_model) -> Qwen2_5_VisionTransformerPretrainedModel:
    """transformers' own tower (stock attention, SDPA per segment) with the tiny model's vision weights."""
    tower = Qwen2_5_VisionTransformerPretrainedModel(hf_vision_config(tiny_model.config.vision))
    tower.load_state_dict(tiny_model.visual.state_dict(), strict=True)  # same keys, nothing left over
    return tower.to(torch.float32).eval()


def test_blocks_use_segment_attention_with_stock_parameter_names(tiny_model, stock_tower):
    assert all(type(block.attn) is SegmentAttention for block in tiny_model.visual.blocks)
    assert all(type(block.attn) is Qwen2_5_VLVisionAttention for block in stock_tower.blocks)
    assert list(tiny_model.visual.state_dict()) == list(stock_tower.state_dict())


@pytest.mark.parametrize("name", list(GRIDS))
@torch.no_grad()
def test_encode_equals_stock_per_segment_loop(tiny_model, stock_tower, name):
    grid = GRIDS[name]
    px, grid_thw = _pixels(grid, seed=3), torch.tensor(grid)
    expected = stock_tower(px, grid_thw).pooler_output
    # fp32; the patch embedding as a GEMM sums in another order than the Conv3d (differences ~1e-6)
    tol = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(tiny_model.visual.encode(px, grid_thw), expected, **tol)
    # a direct forward call (no encode layout: segment lengths read back from cu_seqlens) agrees too
    direct = tiny_model.visual(px, grid_thw).pooler_output
    torch.testing.assert_close(direct, expected, **tol)


@torch.no_grad()
def test_one_sdpa_call_per_segment_length(tiny_model, monkeypatch):
    """Window layer: 12 windows of 64 rows + 6 of 32 -> 2 calls; full layer: 3 frames of 320 -> 1 call."""
    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        shapes.append(tuple(q.shape))
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(vision.F, "scaled_dot_product_attention", spy)
    grid = GRIDS["video"]
    tiny_model.visual.encode(_pixels(grid), torch.tensor(grid))
    heads = tiny_model.config.vision.num_heads
    head_dim = tiny_model.config.vision.hidden_size // heads
    assert shapes == [(12, heads, 64, head_dim), (6, heads, 32, head_dim), (3, heads, 320, head_dim)]


@torch.no_grad()
def test_encode_reads_segment_lengths_from_its_cached_layout(tiny_model, monkeypatch):
    """Once a grid's layout is built, encode never rebuilds segment groups (no read-back of cu_seqlens)
    and the precomputed tensors are consumed by the forward, not passed down to the blocks."""
    grid = GRIDS["images"]
    px, grid_thw = _pixels(grid, seed=4), torch.tensor(grid)
    expected = tiny_model.visual.encode(px, grid_thw)
    layout = tiny_model.visual.layout(grid_thw)

    def fail(*args, **kwargs):
        raise AssertionError("segment groups rebuilt during encode")

    block_kwargs = []
    monkeypatch.setattr(vision, "segment_groups", fail)
    hook = tiny_model.visual.blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: block_kwargs.append(kwargs), with_kwargs=True
    )
    try:
        again = tiny_model.visual.encode(px, grid_thw)
    finally:
        hook.remove()
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    (kwargs,) = block_kwargs
    assert kwargs["cu_seqlens"] is layout.cu_window_seqlens  # block 0 is a window-attention block
    assert not {"position_ids", "window_index", "cu_window_seqlens"} & set(kwargs)


def test_segment_groups_keep_row_order():
    (all_equal,) = segment_groups([4, 4, 4], torch.device("cpu"))
    assert (all_equal.seq_len, all_equal.num_segments, all_equal.rows) == (4, 3, None)
    fours, twos = segment_groups([4, 2, 4, 0, 2], torch.device("cpu"))
    assert (fours.seq_len, fours.num_segments, fours.rows.tolist()) == (4, 2, [0, 1, 2, 3, 6, 7, 8, 9])
    assert (twos.seq_len, twos.num_segments, twos.rows.tolist()) == (2, 2, [4, 5, 10, 11])


@torch.no_grad()
def test_aligned_mlp_pads_to_a_multiple_of_eight_exactly() -> None:
    """An unaligned intermediate width (60) is zero-padded to 64 and gate|up fused: same output as the
    stock MLP, same state-dict names and shapes, Linears viewing the padded tensors, idempotent."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

    from model.vision import ActiveEncode, AlignedMLP

    cfg = Qwen2_5_VLVisionConfig(hidden_size=32, intermediate_size=60, hidden_act="silu")
    torch.manual_seed(0)
    stock = Qwen2_5_VLMLP(cfg, bias=True)
    mlp = AlignedMLP(cfg, ActiveEncode())
    mlp.load_state_dict(stock.state_dict())
    x = torch.randn(5, 32)
    mlp.fuse_projections()
    assert mlp.gate_up_weight.shape == (128, 32) and mlp.down_weight.shape == (32, 64)
    assert {k: v.shape for k, v in mlp.state_dict().items()} == {
        k: v.shape for k, v in stock.state_dict().items()
    }
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_weight[64:].data_ptr()
    torch.testing.assert_close(mlp(x), stock(x), rtol=1e-5, atol=1e-6)
    fused = mlp.gate_up_weight
    mlp.fuse_projections()
    assert mlp.gate_up_weight is fused


@torch.no_grad()
def test_patch_embed_gemm_equals_stock_conv3d() -> None:
    """The patch embedding as a GEMM gives the stock Conv3d's output on processor rows."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    from model.vision import PatchEmbed

    torch.manual_seed(0)
    stock = Qwen2_5_VisionPatchEmbed(patch_size=4, temporal_patch_size=2, in_channels=3, embed_dim=24)
    ours = PatchEmbed(4, 2, 3, 24)
    ours.load_state_dict(stock.state_dict())
    rows = torch.randn(10, 3 * 2 * 4 * 4)
    torch.testing.assert_close(ours(rows), stock(rows), rtol=1e-5, atol=1e-5)
