"""InfiniteVLProcessor on a tiny checkpoint directory: chat template, expansion, media checks, positions."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from model.processor import InfiniteVLProcessor, VideoInput
from model.tokenizer_builder import write_tokenizer_files

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def ckpt_dir(request, tmp_path_factory) -> Path:
    """The shared tiny checkpoint when the project provides one, else tokenizer files + a minimal config."""
    try:
        return Path(request.getfixturevalue("tiny_ckpt_dir"))
    except pytest.FixtureLookupError:
        out = tmp_path_factory.mktemp("processor_ckpt")
        ids = write_tokenizer_files(out, seed=0)
        config = dict(ids, vision_config={"spatial_merge_size": 2, "tokens_per_second": 2})
        (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return out


@pytest.fixture(scope="module")
def proc(ckpt_dir) -> InfiniteVLProcessor:
    return InfiniteVLProcessor.from_pretrained(ckpt_dir)


def _image(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def test_chat_template_matches_spec_example(proc):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        "<|image_pad|><|vision_end|>Describe it.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert proc.apply_chat_template(messages) == expected


def test_chat_template_roles_strings_and_no_generation_prompt(proc):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nab<|im_end|>\n"
    )
    assert proc.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert proc.apply_chat_template(messages) == expected + "<|im_start|>assistant\n"


def test_chat_template_vision_ids_count_across_conversation(proc):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "x"}]},
        {"role": "assistant", "content": "y"},
        {"role": "user", "content": [{"type": "image"}]},
    ]
    plain = proc.apply_chat_template(messages, add_generation_prompt=False)
    assert plain == (
        f"{SYSTEM}<|im_start|>user\n{IMAGE}{VIDEO}x<|im_end|>\n<|im_start|>assistant\ny<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE}<|im_end|>\n"
    )
    numbered = proc.apply_chat_template(messages, add_generation_prompt=False, add_vision_id=True)
    assert numbered == (
        f"{SYSTEM}<|im_start|>user\nPicture 1: {IMAGE}Video 1: {VIDEO}x<|im_end|>\n"
        f"<|im_start|>assistant\ny<|im_end|>\n<|im_start|>user\nPicture 2: {IMAGE}<|im_end|>\n"
    )


def test_448_image_expands_to_256_pads(proc):
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    )
    out = proc.process(text, [_image(448, 448)])
    tid = proc.token_ids
    assert out.input_ids.count(tid.image_token_id) == 256
    assert proc.count_image_tokens(448, 448) == 256
    assert out.mm.image_grid_thw.tolist() == [[1, 32, 32]]
    assert out.mm.image_grid_thw.dtype == torch.int64
    assert out.mm.pixel_values.shape == (1024, 1176)
    assert out.mm.pixel_values_videos is None and out.mm.num_videos == 0
    # the expanded prompt is the template text with the single pad repeated
    expected = proc.tokenizer.encode(
        text.replace("<|image_pad|>", "<|image_pad|>" * 256), add_special_tokens=False
    )
    assert out.input_ids == expected
    assert out.positions.shape == (3, len(out.input_ids))
    start = out.input_ids.index(tid.image_token_id)
    # pads: t = start, h = start + row, w = start + col over a 16 x 16 merged grid (spec 5.2)
    rows, cols = torch.arange(256) // 16, torch.arange(256) % 16
    block = out.positions[:, start : start + 256]
    assert torch.equal(block[0], torch.full((256,), start))
    assert torch.equal(block[1], start + rows) and torch.equal(block[2], start + cols)
    assert out.rope_delta == int(out.positions.max()) + 1 - len(out.input_ids) == 16 - 256


def test_count_image_tokens_spec_example_and_overrides(proc):
    assert proc.count_image_tokens(720, 1280) == 1196
    assert proc.count_image_tokens(448, 448, max_pixels=224 * 224) == 64
    out = proc.process(IMAGE, [_image(448, 448)], image_max_pixels=224 * 224)
    assert out.mm.image_grid_thw.tolist() == [[1, 16, 16]]
    assert len(out.input_ids) == 2 + 64


def test_text_only_prompt(proc):
    out = proc.process("Hello there, how are you?")
    assert out.mm is None and out.rope_delta == 0
    assert torch.equal(out.positions, torch.arange(len(out.input_ids)).expand(3, -1))


def test_short_video_grid_and_positions(proc):
    frames = [_image(224, 224, seed=s) for s in range(4)]
    text = f"<|im_start|>user\n{VIDEO}What happens?<|im_end|>\n"
    out = proc.process(text, videos=[VideoInput(frames, fps=2.0)])
    # 224x224 is below the 100,352-pixel video minimum: scaled up to 336x336 -> grid (2, 24, 24)
    assert out.mm.video_grid_thw.tolist() == [[2, 24, 24]]
    assert out.mm.second_per_grid_ts == [1.0]
    assert out.mm.pixel_values_videos.shape == (2 * 24 * 24, 1176)
    tid = proc.token_ids
    assert out.input_ids.count(tid.video_token_id) == 2 * 12 * 12 == proc.count_video_tokens(4, 224, 224)
    start = out.input_ids.index(tid.video_token_id)
    i = torch.arange(288)
    block = out.positions[:, start : start + 288]
    # p_t = base + 2 * i_t (second_per_grid_t 1.0 x tokens_per_second 2), p_h / p_w the merged grid
    assert torch.equal(block[0], start + 2 * (i // 144))
    assert torch.equal(block[1], start + (i % 144) // 12)
    assert torch.equal(block[2], start + i % 12)
    after = out.positions[:, start + 288]
    assert after.tolist() == [start + 12] * 3  # vision_end follows max(2, 11, 11) + 1


def test_mismatched_media_raises(proc):
    with pytest.raises(ValueError):
        proc.process(IMAGE)  # placeholder without an image
    with pytest.raises(ValueError):
        proc.process(IMAGE, [_image(56, 56), _image(56, 56)])  # two images, one placeholder
    with pytest.raises(ValueError):
        proc.process("no placeholder", videos=[VideoInput([_image(56, 56)] * 2, fps=2.0)])


def test_image_and_video_in_one_prompt(proc):
    frames = [_image(224, 224, seed=s) for s in range(2)]
    out = proc.process(f"{VIDEO} and {IMAGE}", [_image(56, 56)], [VideoInput(frames, fps=2.0)])
    assert out.mm.num_images == 1 and out.mm.num_videos == 1
    assert out.input_ids.count(proc.token_ids.image_token_id) == 4  # 56x56: 4x4 patches
    assert out.input_ids.count(proc.token_ids.video_token_id) == 144
    assert out.positions.shape == (3, len(out.input_ids))
