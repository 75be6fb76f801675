"""Video preprocessing without torchvision: smart_resize, patch order, frame padding, frame sampling."""

import random

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from model.video import patchify, preprocess_video, smart_resize

IMAGE_MAX = 28 * 28 * 16384


def _noise_image(height: int, width: int, seed: int, mode: str = "RGB") -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def test_smart_resize_spec_examples():
    assert smart_resize(720, 1280, 28, 3136, IMAGE_MAX) == (728, 1288)
    assert smart_resize(448, 448, 28, 3136, IMAGE_MAX) == (448, 448)
    # too large: scaled down by sqrt(area / max), floored to the factor
    assert smart_resize(4000, 3000, 28, 3136, 1003520) == (1148, 840)
    # too small: scaled up by sqrt(min / area), ceiled to the factor
    assert smart_resize(10, 20, 28, 3136, IMAGE_MAX) == (56, 84)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError):
        smart_resize(10, 2010)
    assert smart_resize(10, 2000, 28, 3136, IMAGE_MAX)[1] % 28 == 0  # exactly 200 is accepted


def test_smart_resize_agrees_with_transformers():
    rng = random.Random(0)
    for _ in range(300):
        h, w = rng.randint(8, 5000), rng.randint(8, 5000)
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = rng.choice([(3136, IMAGE_MAX), (100352, 602112), (3136, 1003520)])
        assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi)


@pytest.mark.parametrize(("size", "mode"), [((100, 150), "RGB"), ((60, 200), "RGBA"), ((90, 90), "L")])
def test_two_frame_video_equals_image_processor(size, mode):
    image = _noise_image(*size, seed=1, mode=mode)
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=IMAGE_MAX)
    ref = processor(images=[image], return_tensors="pt")
    pixels, grid, _ = preprocess_video([image, image], fps=2.0, min_pixels=3136, max_pixels=IMAGE_MAX)
    assert grid == tuple(ref["image_grid_thw"][0].tolist())
    assert pixels.dtype == torch.float32 and pixels.shape[1] == 1176
    assert torch.equal(pixels, ref["pixel_values"])


def test_patchify_order_by_construction():
    # Each pixel encodes its own (frame, channel, row, col); check where patch rows land.
    t, c, h, w, p = 2, 3, 8, 8, 2  # grid 4x4 patches, merge 2 -> 2x2 units
    frames = np.zeros((t, c, h, w), dtype=np.float32)
    for f in range(t):
        for ch in range(c):
            frames[f, ch] = np.arange(h * w).reshape(h, w) + 1000 * ch + 10000 * f
    rows = patchify(frames, patch_size=p, temporal_patch_size=2, merge_size=2)
    assert rows.shape == (16, c * 2 * p * p)
    # 3rd row: unit (0, 0), patch (1, 0) -> patch grid (1, 0) -> pixel origin (2, 0)
    first_pixel = rows[2].reshape(c, 2, p, p)
    assert first_pixel[0, 0, 0, 0] == 2 * w + 0
    # 5th row: unit (0, 1), patch (0, 0) -> patch grid (0, 2) -> pixel origin (0, 4)
    assert rows[4].reshape(c, 2, p, p)[0, 0, 0, 0] == 4
    # flattening order (channel, frame, row, col)
    assert rows[0].reshape(c, 2, p, p)[2, 1, 1, 1] == 2000 + 10000 + 1 * w + 1


def test_odd_frame_count_repeats_last_frame():
    frames = [_noise_image(56, 84, seed=s) for s in range(3)]
    pixels, grid, second = preprocess_video(frames, fps=1.0, min_pixels=3136, max_pixels=IMAGE_MAX)
    assert grid == (2, 4, 6)
    assert second == 2.0
    assert pixels.shape == (2 * 4 * 6, 1176)
    last, _, _ = preprocess_video([frames[2], frames[2]], fps=1.0, min_pixels=3136, max_pixels=IMAGE_MAX)
    assert torch.equal(pixels[24:], last)


def test_frames_resized_to_first_frame_size():
    frames = [_noise_image(56, 84, seed=0), _noise_image(100, 50, seed=1)]
    pixels, grid, _ = preprocess_video(frames, fps=2.0, min_pixels=3136, max_pixels=IMAGE_MAX)
    assert grid == (1, 4, 6) and pixels.shape == (24, 1176)


def test_default_video_bounds():
    frame = _noise_image(720, 1280, seed=0)
    _, grid, second = preprocess_video([frame, frame], fps=2.0)
    assert second == 1.0
    h, w = grid[1] * 14, grid[2] * 14
    assert 100352 <= h * w <= 602112 and h % 28 == 0 and w % 28 == 0
