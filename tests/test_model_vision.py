"""Vision tower on the tiny checkpoint: merged-token counts and injection at the pad positions."""

from __future__ import annotations

import pytest
import torch
from model_helpers import new_state, text_positions

from model.batch import BatchMeta

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
