"""Video frame preprocessing for the Qwen2.5-VL vision tower, without torchvision (spec 7.1).

The steps and their numerics follow transformers' PIL image processor, so a video made of two copies of an
image gives exactly the image's pixel values: RGB conversion (alpha composited on white), PIL bicubic resize
of uint8 pixels, rescale in float64 then cast to float32, normalisation in float32, then patchify.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch
from torch import Tensor

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_MIN_PIXELS = 128 * 28 * 28  # 100,352 per frame
VIDEO_MAX_PIXELS = 768 * 28 * 28  # 602,112 per frame


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16384
) -> tuple[int, int]:
    """Target (height, width), both multiples of `factor`, area within [min_pixels, max_pixels] (spec 7.1).

    Raises ValueError when the aspect ratio exceeds 200.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be at most 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB copy of `image`; transparency is composited onto a white background."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def normalize_frame(
    image: PIL.Image.Image,
    size: tuple[int, int],
    mean: tuple[float, ...] = IMAGE_MEAN,
    std: tuple[float, ...] = IMAGE_STD,
) -> np.ndarray:
    """[3, H, W] float32: RGB, bicubic resize to `size` (height, width), x/255, (x - mean) / std."""
    height, width = size
    resized = to_rgb(image).resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
    pixels = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def patchify(
    frames: np.ndarray, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> np.ndarray:
    """[T, C, H, W] (T a multiple of temporal_patch_size) -> [T/tp * H/p * W/p, C * tp * p * p].

    Row order: per temporal group, merge units row-major over the (H/p/m, W/p/m) grid, inside a unit its
    patches (0,0), (0,1), (1,0), (1,1); each row flattened in (channel, frame, row, col) order.
    """
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    m, p, tp = merge_size, patch_size, temporal_patch_size
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # axes: 0 gt, 1 tp, 2 c, 3 unit row, 4 row in unit, 5 pixel row, 6 unit col, 7 col in unit, 8 pixel col
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p))


def preprocess_video(
    frames: list[PIL.Image.Image],
    *,
    fps: float,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean: tuple[float, ...] = IMAGE_MEAN,
    std: tuple[float, ...] = IMAGE_STD,
) -> tuple[Tensor, tuple[int, int, int], float]:
    """Frames sampled at `fps` -> (pixel_values [N, 3*tp*p*p] float32, grid_thw (t, h/p, w/p), seconds/grid).

    Every frame is resized to the smart_resize size of the first frame; the frame count is padded to a
    multiple of `temporal_patch_size` by repeating the last frame. second_per_grid_t = temporal_patch_size / fps.
    """
    if not frames:
        raise ValueError("a video needs at least one frame")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    width, height = frames[0].size
    size = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    frames = list(frames) + [frames[-1]] * (-len(frames) % temporal_patch_size)
    grid_thw = (len(frames) // temporal_patch_size, size[0] // patch_size, size[1] // patch_size)
    rows_per_group = grid_thw[1] * grid_thw[2]
    # [N, 3 * tp * p * p] float32, filled one temporal group at a time (peak memory ~ output + one group)
    row_len = 3 * temporal_patch_size * patch_size * patch_size
    pixel_values = torch.empty(grid_thw[0] * rows_per_group, row_len, dtype=torch.float32)
    for g in range(grid_thw[0]):
        group = frames[g * temporal_patch_size : (g + 1) * temporal_patch_size]
        stacked = np.stack([normalize_frame(frame, size, mean, std) for frame in group])  # [tp, 3, H, W]
        rows = patchify(stacked, patch_size, temporal_patch_size, merge_size)
        pixel_values[g * rows_per_group : (g + 1) * rows_per_group] = torch.from_numpy(rows)
    return pixel_values, grid_thw, temporal_patch_size / fps
