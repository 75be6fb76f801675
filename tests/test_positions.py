"""M-RoPE positions: the worked examples of spec 5.3, text only, continuation, the time truncation quirk."""

import pytest
import torch

from model.positions import continuation_positions, get_rope_index

VS, VE, IMG, VID = 100, 101, 102, 103  # vision_start, vision_end, image_pad, video_pad (arbitrary ids)
A, B, C, D = 1, 2, 3, 4
IDS = {"image_token_id": IMG, "video_token_id": VID, "vision_start_token_id": VS}


def _rope(ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None, **kw):
    return get_rope_index(
        ids,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
        **IDS,
        **kw,
    )


def test_image_worked_example():
    ids = [A, B, VS] + [IMG] * 6 + [VE, C, D]
    pos, delta = _rope(ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
    assert pos.dtype == torch.int64 and pos.shape == (3, 12)
    assert pos[0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]
    assert pos[1].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]
    assert delta == -3


def test_video_worked_example():
    ids = [A, VS] + [VID] * 8 + [VE, B]
    pos, delta = _rope(ids, video_grid_thw=[[2, 4, 4]], second_per_grid_ts=[1.0])
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 4, 4, 4, 4, 5, 6]
    assert pos[1].tolist() == [0, 1, 2, 2, 3, 3, 2, 2, 3, 3, 5, 6]
    assert pos[2].tolist() == [0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 5, 6]
    assert delta == -5


def test_video_default_second_per_grid_is_one():
    ids = [A, VS] + [VID] * 8 + [VE, B]
    with_default, _ = _rope(ids, video_grid_thw=[[2, 4, 4]])
    explicit, _ = _rope(ids, video_grid_thw=[[2, 4, 4]], second_per_grid_ts=[1.0])
    assert torch.equal(with_default, explicit)


@pytest.mark.parametrize(("seconds", "step"), [(0.5, 0), (1.5, 2), (2.0, 4)])
def test_video_time_truncated_before_scaling(seconds, step):
    # int(second_per_grid_t) * tokens_per_second: 0.5 -> 0, 1.5 -> 1 -> 2, 2.0 -> 4
    ids = [VS] + [VID] * 3 + [VE]
    pos, _ = _rope(ids, video_grid_thw=[[3, 2, 2]], second_per_grid_ts=[seconds])
    assert pos[0, 1:4].tolist() == [1, 1 + step, 1 + 2 * step]


def test_text_only():
    pos, delta = _rope(list(range(7)))
    assert delta == 0
    assert torch.equal(pos, torch.arange(7).expand(3, 7))


def test_continuation_follows_prompt():
    ids = [A, B, VS] + [IMG] * 6 + [VE, C, D]
    pos, delta = _rope(torch.tensor(ids), image_grid_thw=[[1, 4, 6]])
    cont = continuation_positions(len(ids), 3, delta)
    assert cont.shape == (3, 3) and cont.dtype == torch.int64
    first = int(pos.max()) + 1
    assert cont.tolist() == [[first, first + 1, first + 2]] * 3


def test_image_then_video_consume_their_own_grids():
    ids = [A, VS, IMG, VE, VS] + [VID] * 2 + [VE, B]
    pos, delta = _rope(ids, image_grid_thw=[[1, 2, 2]], video_grid_thw=[[2, 2, 2]], second_per_grid_ts=[1.0])
    # image (1 token) at 2; ve 3, vs 4; video tokens base 5, t offsets 0 and 2; ve 8, b 9
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert delta == 10 - 9


def test_mismatched_media_count_raises():
    ids = [A, VS] + [IMG] * 6 + [VE]
    with pytest.raises(ValueError):
        _rope(ids)
    with pytest.raises(ValueError):
        _rope(ids, image_grid_thw=[[1, 4, 4]])  # grid wants 4 pads, prompt has 6 -> run mismatch at end
