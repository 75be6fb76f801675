"""Prompt processor: chat template, tokenisation, image/video preprocessing, placeholder expansion, positions.

`InfiniteVLProcessor.process` turns a rendered prompt plus its media into token ids with every
`<|image_pad|>` / `<|video_pad|>` expanded to one token per merged vision token (spec 7.2), the vision
inputs, and the full-prompt M-RoPE positions (spec 5). Images go through transformers' PIL image processor;
videos through `model.video` (no torchvision).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase, Qwen2VLImageProcessorPil

from model.config import VisionConfig
from model.positions import get_rope_index
from model.tokenizer_builder import CHAT_TEMPLATE
from model.video import (
    IMAGE_MEAN,
    IMAGE_STD,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    preprocess_video,
    smart_resize,
)
from serving.types import MultiModalInputs

# preprocessor_config.json keys the image processor constructor accepts
_IMAGE_KEYS = (
    "do_convert_rgb",
    "do_normalize",
    "do_rescale",
    "do_resize",
    "image_mean",
    "image_std",
    "max_pixels",
    "merge_size",
    "min_pixels",
    "patch_size",
    "resample",
    "rescale_factor",
    "size",
    "temporal_patch_size",
)


@dataclass
class VideoInput:
    """Frames of one video, already sampled at `fps` frames per second."""

    frames: list[PIL.Image.Image]
    fps: float


@dataclass
class ProcessedPrompt:
    """One prompt ready for the engine."""

    input_ids: list[int]  # placeholders expanded; no BOS
    positions: Tensor  # [3, len(input_ids)] int64 M-RoPE positions
    rope_delta: int  # token at absolute index i >= len(input_ids) gets position i + rope_delta
    mm: MultiModalInputs | None  # None for a text-only prompt


@dataclass(frozen=True)
class VideoSettings:
    """Per-frame video preprocessing settings (video_preprocessor_config.json)."""

    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    fps: float = 2.0  # default sampling rate when a caller samples frames
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = IMAGE_MEAN
    image_std: tuple[float, ...] = IMAGE_STD

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoSettings:
        size = d.get("size") or {}
        return cls(
            min_pixels=int(d.get("min_pixels") or size.get("shortest_edge") or VIDEO_MIN_PIXELS),
            max_pixels=int(d.get("max_pixels") or size.get("longest_edge") or VIDEO_MAX_PIXELS),
            fps=float(d.get("fps") or 2.0),
            patch_size=int(d.get("patch_size", 14)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            merge_size=int(d.get("merge_size", 2)),
            image_mean=tuple(d.get("image_mean", IMAGE_MEAN)),
            image_std=tuple(d.get("image_std", IMAGE_STD)),
        )


@dataclass(frozen=True)
class VisionTokenIds:
    """Token ids and vision constants the processor needs (from config.json)."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    spatial_merge_size: int = 2
    tokens_per_second: float = 2


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_chat_template(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> str:
    """chat_template.jinja, else chat_template.json, else the tokenizer's, else the built-in Qwen2.5-VL one."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    from_json = _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(from_json, str):
        return from_json
    if isinstance(tokenizer.chat_template, str):
        return tokenizer.chat_template
    return CHAT_TEMPLATE


def _load_token_ids(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> VisionTokenIds:
    """Ids from config.json (top level or text_config), falling back to the tokenizer's vocabulary."""
    raw = _read_json(model_dir / "config.json")
    merged = {**raw, **(raw.get("text_config") or {})}
    vision = VisionConfig.from_dict(raw.get("vision_config") or {})  # absent fields: reference defaults

    def pick(key: str, token: str) -> int:
        value = merged.get(key)
        return int(value) if value is not None else int(tokenizer.convert_tokens_to_ids(token))

    return VisionTokenIds(
        image_token_id=pick("image_token_id", "<|image_pad|>"),
        video_token_id=pick("video_token_id", "<|video_pad|>"),
        vision_start_token_id=pick("vision_start_token_id", "<|vision_start|>"),
        vision_end_token_id=pick("vision_end_token_id", "<|vision_end|>"),
        spatial_merge_size=vision.spatial_merge_size,
        tokens_per_second=vision.tokens_per_second,
    )


def _expand(ids: list[int], token_id: int, counts: Sequence[int]) -> list[int]:
    """Replace the k-th occurrence of `token_id` by counts[k] copies (occurrences must equal len(counts))."""
    out: list[int] = []
    k = 0
    for tok in ids:
        if tok == token_id:
            out.extend([token_id] * counts[k])
            k += 1
        else:
            out.append(tok)
    return out


@dataclass
class _Media:
    pixel_values: Tensor | None = None
    grid_thw: Tensor | None = None  # [n, 3] int64
    seconds: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return 0 if self.grid_thw is None else int(self.grid_thw.shape[0])


class InfiniteVLProcessor:
    """Chat template, tokenizer and vision preprocessing of one checkpoint directory."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Qwen2VLImageProcessorPil,
        video_settings: VideoSettings,
        chat_template: str,
        token_ids: VisionTokenIds,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video_settings = video_settings
        self.chat_template = chat_template
        self.token_ids = token_ids
        self.image_token_id = token_ids.image_token_id
        self.video_token_id = token_ids.video_token_id

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> InfiniteVLProcessor:
        """Load tokenizer (fast), image processor (PIL), video settings, chat template and token ids."""
        model_dir = Path(model_dir)
        # An empty config stops AutoTokenizer from parsing config.json (model_type `infinite_vl` is unknown to
        # transformers and only triggers warnings); the class comes from tokenizer_config.json.
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True, config=PreTrainedConfig())
        image_cfg = _read_json(model_dir / "preprocessor_config.json")
        image_processor = Qwen2VLImageProcessorPil(**{k: image_cfg[k] for k in _IMAGE_KEYS if k in image_cfg})
        video_settings = VideoSettings.from_dict(_read_json(model_dir / "video_preprocessor_config.json"))
        return cls(
            tokenizer=tokenizer,
            image_processor=image_processor,
            video_settings=video_settings,
            chat_template=_load_chat_template(model_dir, tokenizer),
            token_ids=_load_token_ids(model_dir, tokenizer),
        )

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, add_vision_id: bool = False
    ) -> str:
        """Render messages (roles system/user/assistant; content str or list of text/image/video items)."""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            add_vision_id=add_vision_id,
        )

    def _image_bounds(self, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
        size = self.image_processor.size
        return (
            int(min_pixels if min_pixels is not None else size.shortest_edge),
            int(max_pixels if max_pixels is not None else size.longest_edge),
        )

    def count_image_tokens(
        self, height: int, width: int, *, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> int:
        """Merged vision tokens (= `<|image_pad|>` copies) an image of height x width pixels yields."""
        lo, hi = self._image_bounds(min_pixels, max_pixels)
        patch, merge = self.image_processor.patch_size, self.image_processor.merge_size
        h, w = smart_resize(height, width, patch * merge, lo, hi)
        return (h // patch) * (w // patch) // (merge * merge)

    def count_video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Merged vision tokens a video of `num_frames` frames of height x width pixels yields."""
        s = self.video_settings
        h, w = smart_resize(height, width, s.patch_size * s.merge_size, s.min_pixels, s.max_pixels)
        grid_t = -(-num_frames // s.temporal_patch_size)
        return grid_t * (h // s.patch_size) * (w // s.patch_size) // (s.merge_size * s.merge_size)

    def _process_images(
        self, images: Sequence[PIL.Image.Image], min_pixels: int | None, max_pixels: int | None
    ) -> _Media:
        if not images:
            return _Media()
        lo, hi = self._image_bounds(min_pixels, max_pixels)
        out = self.image_processor(
            images=list(images), return_tensors="pt", size={"shortest_edge": lo, "longest_edge": hi}
        )
        return _Media(out["pixel_values"], out["image_grid_thw"].to(torch.int64))

    def _process_videos(self, videos: Sequence[VideoInput]) -> _Media:
        if not videos:
            return _Media()
        s = self.video_settings
        pixels, grids, seconds = [], [], []
        for video in videos:
            pv, grid, second = preprocess_video(
                video.frames,
                fps=video.fps,
                min_pixels=s.min_pixels,
                max_pixels=s.max_pixels,
                patch_size=s.patch_size,
                temporal_patch_size=s.temporal_patch_size,
                merge_size=s.merge_size,
                mean=s.image_mean,
                std=s.image_std,
            )
            pixels.append(pv)
            grids.append(grid)
            seconds.append(second)
        return _Media(torch.cat(pixels), torch.tensor(grids, dtype=torch.int64), seconds)

    def _merged_counts(self, media: _Media) -> list[int]:
        if media.grid_thw is None:
            return []
        merge = self.token_ids.spatial_merge_size
        return [int(n) // (merge * merge) for n in media.grid_thw.prod(dim=-1).tolist()]

    def _check_placeholders(self, ids: list[int], token_id: int, expected: int, kind: str) -> None:
        found = ids.count(token_id)
        if found != expected:
            raise ValueError(f"prompt has {found} {kind} placeholders but {expected} {kind}s were given")

    def process(
        self,
        text: str,
        images: Sequence[PIL.Image.Image] = (),
        videos: Sequence[VideoInput] = (),
        *,
        image_min_pixels: int | None = None,
        image_max_pixels: int | None = None,
    ) -> ProcessedPrompt:
        """Tokenise a rendered prompt (no BOS), preprocess its media in placeholder order, expand the
        placeholders and compute positions. Raises ValueError when placeholders and media disagree."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        self._check_placeholders(ids, self.image_token_id, len(images), "image")
        self._check_placeholders(ids, self.video_token_id, len(videos), "video")
        image_media = self._process_images(images, image_min_pixels, image_max_pixels)
        video_media = self._process_videos(videos)
        ids = _expand(ids, self.image_token_id, self._merged_counts(image_media))
        ids = _expand(ids, self.video_token_id, self._merged_counts(video_media))
        t = self.token_ids
        positions, rope_delta = get_rope_index(
            ids,
            image_grid_thw=image_media.grid_thw,
            video_grid_thw=video_media.grid_thw,
            second_per_grid_ts=video_media.seconds or None,
            image_token_id=t.image_token_id,
            video_token_id=t.video_token_id,
            vision_start_token_id=t.vision_start_token_id,
            spatial_merge_size=t.spatial_merge_size,
            tokens_per_second=t.tokens_per_second,
        )
        mm = None
        if image_media.count or video_media.count:
            mm = MultiModalInputs(
                pixel_values=image_media.pixel_values,
                image_grid_thw=image_media.grid_thw,
                pixel_values_videos=video_media.pixel_values,
                video_grid_thw=video_media.grid_thw,
                second_per_grid_ts=video_media.seconds or None,
            )
        return ProcessedPrompt(input_ids=ids, positions=positions, rope_delta=rope_delta, mm=mm)
