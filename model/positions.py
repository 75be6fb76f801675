"""M-RoPE position ids of a prompt (spec section 5): the standard Qwen2.5-VL `get_rope_index`.

One sequence, no padding. Positions are a [3, L] int64 tensor of (temporal, height, width) rows; text tokens
carry the same value on all three rows, vision pad tokens carry their (t, h, w) grid coordinates offset by
the position after the preceding text. Later tokens continue at `index + rope_delta` on all three rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

GridList = Tensor | Sequence[Sequence[int]] | None


def _as_list(input_ids: list[int] | Tensor) -> list[int]:
    if isinstance(input_ids, Tensor):
        return [int(x) for x in input_ids.reshape(-1).tolist()]
    return list(input_ids)


def _grids(grid_thw: GridList) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    rows = grid_thw.tolist() if isinstance(grid_thw, Tensor) else grid_thw
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def _text_block(start: int, length: int) -> Tensor:
    """[3, length] positions start, start+1, ... on all three rows."""
    return torch.arange(start, start + length, dtype=torch.int64).expand(3, -1)


def _vision_block(base: int, grid: tuple[int, int, int], merge: int, time_scale: float) -> Tensor:
    """[3, t*(h/m)*(w/m)] positions of one image/video block in row-major (t, h, w) order.

    `time_scale` is tokens_per_second * int(second_per_grid_t) for videos (0 for images); the temporal
    offset is truncated to an integer like the reference's `.long()`.
    """
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    t_index = torch.tensor([int(i * time_scale) for i in range(t)], dtype=torch.int64)
    t_rows = t_index.view(t, 1, 1).expand(t, h, w).reshape(-1)
    h_rows = torch.arange(h, dtype=torch.int64).view(1, h, 1).expand(t, h, w).reshape(-1)
    w_rows = torch.arange(w, dtype=torch.int64).view(1, 1, w).expand(t, h, w).reshape(-1)
    return torch.stack([t_rows, h_rows, w_rows]) + base


def _block_kinds(
    ids: list[int], vision_start_token_id: int, image_token_id: int, video_token_id: int
) -> list[int]:
    """Kind (image or video token id) of each vision block, in textual order: the token after each start."""
    kinds = []
    for i, tok in enumerate(ids[:-1]):
        if tok == vision_start_token_id and ids[i + 1] in (image_token_id, video_token_id):
            kinds.append(ids[i + 1])
    return kinds


def _check_pad_run(ids: list[int], start: int, count: int, token_id: int) -> None:
    run = ids[start : start + count + 1]  # the block's placeholders and the token after them
    if len(run) < count or any(tok != token_id for tok in run[:count]) or run[count:] == [token_id]:
        raise ValueError(
            f"vision block at token {start} needs {count} consecutive placeholder tokens {token_id}; "
            "the prompt does not match the media grid"
        )


def get_rope_index(
    input_ids: list[int] | Tensor,
    *,
    image_grid_thw: GridList,
    video_grid_thw: GridList,
    second_per_grid_ts: Sequence[float] | Tensor | None,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2,
) -> tuple[Tensor, int]:
    """3-D M-RoPE positions [3, L] int64 of one unpadded prompt and its `rope_delta` (spec 5.2).

    Vision blocks are found by the token after each `<|vision_start|>` and consume `image_grid_thw` /
    `video_grid_thw` rows (patch units (t, h, w)) in textual order; `second_per_grid_ts` gives one value
    per video (default 1.0) and is truncated to an integer before use, as the reference does.
    rope_delta = max(position) + 1 - L. Raises ValueError when blocks and grids do not match.
    """
    ids = _as_list(input_ids)
    images, videos = _grids(image_grid_thw), _grids(video_grid_thw)
    seconds = (
        [] if second_per_grid_ts is None else [float(s) for s in torch.as_tensor(second_per_grid_ts).tolist()]
    )
    kinds = _block_kinds(ids, vision_start_token_id, image_token_id, video_token_id)
    num_image_blocks = sum(k == image_token_id for k in kinds)
    if num_image_blocks != len(images) or len(kinds) - num_image_blocks != len(videos):
        raise ValueError(
            f"prompt has {num_image_blocks} image and {len(kinds) - num_image_blocks} video blocks, "
            f"but {len(images)} image and {len(videos)} video grids were given"
        )
    parts: list[Tensor] = []
    next_pos, st, image_idx, video_idx = 0, 0, 0, 0
    for kind in kinds:
        if kind == image_token_id:
            grid, time_scale = images[image_idx], 0.0
            image_idx += 1
        else:
            second = seconds[video_idx] if video_idx < len(seconds) else 1.0
            grid, time_scale = videos[video_idx], int(second) * tokens_per_second
            video_idx += 1
        ed = ids.index(kind, st)  # first placeholder of this block
        num_pads = grid[0] * (grid[1] // spatial_merge_size) * (grid[2] // spatial_merge_size)
        _check_pad_run(ids, ed, num_pads, kind)
        parts.append(_text_block(next_pos, ed - st))
        block = _vision_block(next_pos + ed - st, grid, spatial_merge_size, time_scale)
        parts.append(block)
        next_pos = int(block.max()) + 1
        st = ed + num_pads
    parts.append(_text_block(next_pos, len(ids) - st))
    positions = torch.cat(parts, dim=1).contiguous()
    rope_delta = (int(positions.max()) + 1 - len(ids)) if ids else 0
    return positions, rope_delta


def continuation_positions(start: int, count: int, rope_delta: int) -> Tensor:
    """[3, count] int64 positions of tokens at absolute indices start..start+count-1 (spec 5.4)."""
    return _text_block(start + rope_delta, count).contiguous()
