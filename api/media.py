"""Bounded loading of untrusted images and videos from data:, http(s):, and (opt-in) file: URLs.

Everything here treats its input as hostile: sizes are checked before work is spent (declared byte sizes
before downloading or base64-decoding, pixel counts from headers before decoding, frame counts from the
demuxer before decoding), network fetches go through `api.net` (SSRF checks on every hop), local files are
confined to one directory, and all decoding runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import io
import os
import stat
import urllib.parse
from dataclasses import dataclass

import av
from PIL import Image

from api import net
from model.processor import VideoInput


@dataclass(frozen=True)
class MediaLimits:
    """Server-wide limits on request media (CLI flags in `add_media_args`)."""

    max_image_bytes: int = 20 * 2**20
    max_video_bytes: int = 200 * 2**20
    max_images_per_request: int = 16
    max_videos_per_request: int = 2
    max_image_pixels: int = 12_845_056  # decoded width*height, checked from the header before decoding
    max_video_frames: int = 64  # after sampling
    max_video_frame_pixels: int = 1920 * 1088  # per decoded frame; 64 frames stay under ~400 MB of RGB
    max_video_decoded_frames: int = 20000  # frames in the stream (all are decoded while sampling)
    default_video_fps: float = 2.0
    fetch_timeout_image_s: float = 10.0  # whole fetch: DNS, redirects, body
    fetch_timeout_video_s: float = 60.0
    max_redirects: int = 3
    allowed_schemes: frozenset[str] = frozenset({"http", "https", "data"})  # file: only via the path below
    allowed_domains: frozenset[str] | None = None  # None: any domain
    allow_private_networks: bool = False  # loopback, link-local, private, CGNAT, multicast, reserved, ...
    allowed_local_media_path: str | None = None  # file:// URLs and absolute paths only under this dir

    def fetch_policy(self) -> net.FetchPolicy:
        return net.FetchPolicy(
            allowed_schemes=self.allowed_schemes & net.HTTP_SCHEMES,
            allowed_domains=self.allowed_domains,
            allow_private_networks=self.allow_private_networks,
            max_redirects=self.max_redirects,
        )


class MediaError(Exception):
    """Refused or undecodable media. `status_code`: 413 for too-large items, 400 otherwise."""

    def __init__(self, message: str, status_code: int = 400, param: str = ""):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param

    def with_param(self, param: str) -> MediaError:
        """The same error naming the request field it came from (keeps an existing name)."""
        return MediaError(self.message, self.status_code, self.param or param)


def _too_large(what: str, limit: int) -> MediaError:
    return MediaError(f"{what} is larger than the limit of {limit} bytes", status_code=413)


# --------------------------------------------------------------------------------------------- bytes


def _url_scheme(url: str) -> str:
    if url.startswith("/"):
        return "file"
    scheme, sep, _ = url.partition(":")
    return scheme.lower() if sep else ""


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """Payload of a data: URL (base64 or percent-encoded); size is checked before and after decoding."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("malformed data URL (no ',')")
    if header.lower().endswith(";base64"):
        payload = "".join(payload.split())  # base64 in URLs may be wrapped
        if len(payload) // 4 * 3 > max_bytes + 2:
            raise _too_large("media", max_bytes)
        try:
            data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError("invalid base64 in data URL") from exc
    else:
        if len(payload) > 3 * max_bytes + 3:  # "%XX" is the longest encoding of one byte
            raise _too_large("media", max_bytes)
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise _too_large("media", max_bytes)
    return data


def _local_path(url: str) -> str:
    if url.startswith("/"):
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise MediaError("malformed file URL")
    return urllib.parse.unquote(parts.path)


def read_local_file(url: str, root: str | None, max_bytes: int) -> bytes:
    """Bytes of a file:// URL or absolute path whose real path (symlinks resolved) lies under `root`."""
    if root is None:
        raise MediaError("local media files are not allowed on this server")
    path = _local_path(url)
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if not os.path.isabs(path) or os.path.commonpath([real, real_root]) != real_root:
        raise MediaError("local media path is outside the allowed directory")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise MediaError("local media file cannot be opened") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError("local media path is not a regular file")
        if info.st_size > max_bytes:
            raise _too_large("media file", max_bytes)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large("media file", max_bytes)
    return data


async def load_media_bytes(url: str, limits: MediaLimits, *, max_bytes: int, timeout_s: float) -> bytes:
    """Raw bytes behind a media URL, under the scheme, size and network rules of `limits`."""
    scheme = _url_scheme(url)
    if scheme == "file":
        return await asyncio.to_thread(read_local_file, url, limits.allowed_local_media_path, max_bytes)
    if scheme not in limits.allowed_schemes:
        raise MediaError(f"URL scheme '{scheme}' is not allowed for media")
    if scheme == "data":
        return await asyncio.to_thread(decode_data_url, url, max_bytes)
    if scheme in net.HTTP_SCHEMES:
        try:
            return await net.fetch_url(url, limits.fetch_policy(), max_bytes=max_bytes, timeout_s=timeout_s)
        except net.FetchError as exc:
            raise MediaError(exc.message, exc.status_code) from exc
    raise MediaError(f"URL scheme '{scheme}' is not supported for media")


# --------------------------------------------------------------------------------------------- images

_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")


def sniff_image_format(data: bytes) -> str | None:
    """PIL format name from the file's magic bytes, for the formats we accept; None otherwise."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels are composited onto white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def decode_image(data: bytes, limits: MediaLimits) -> Image.Image:
    """Decode png/jpeg/webp/gif (first frame)/bmp into a fully loaded RGB image (blocking; use a thread).

    The pixel count is read from the header and checked against `limits.max_image_pixels` before any pixel
    data is decoded. Truncated or corrupt data raises MediaError(400); too many pixels MediaError(413).
    """
    fmt = sniff_image_format(data)
    if fmt is None:
        raise MediaError(
            f"unsupported image format (supported: {', '.join(f.lower() for f in _IMAGE_FORMATS)})"
        )
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise MediaError("image has no pixels")
            if width * height > limits.max_image_pixels:
                raise MediaError(
                    f"image too large: {width}x{height} pixels exceeds the limit of "
                    f"{limits.max_image_pixels} pixels",
                    status_code=413,
                )
            image.load()
            return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image too large: {exc}", status_code=413) from exc
    except MediaError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        raise MediaError(f"image data is truncated or corrupt ({fmt.lower()})") from exc


async def fetch_image(url: str, limits: MediaLimits, *, param: str = "") -> Image.Image:
    """Load, check and decode one image URL into a fully decoded RGB PIL image.

    Raises MediaError (with `param` set) for refused, too large, unreachable or undecodable images.
    """
    try:
        data = await load_media_bytes(
            url, limits, max_bytes=limits.max_image_bytes, timeout_s=limits.fetch_timeout_image_s
        )
        return await asyncio.to_thread(decode_image, data, limits)
    except MediaError as exc:
        raise exc.with_param(param) from exc


# --------------------------------------------------------------------------------------------- videos


def sniff_video_container(data: bytes) -> str | None:
    """FFmpeg demuxer name from magic bytes, for the containers we accept; None otherwise.

    Naming the demuxer explicitly keeps FFmpeg from probing into formats that open other files or URLs
    (HLS/DASH playlists, concat lists, image2 patterns).
    """
    if data[4:8] == b"ftyp" or data[4:8] in (b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mov"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def _check_frame_pixels(width: int, height: int, limits: MediaLimits) -> None:
    if width * height > limits.max_video_frame_pixels:
        raise MediaError(
            f"video frames too large: {width}x{height} pixels exceeds the limit of "
            f"{limits.max_video_frame_pixels} pixels per frame",
            status_code=413,
        )


def _frame_times(container: av.container.InputContainer, limits: MediaLimits) -> list[float]:
    """Presentation times in seconds of every frame of the first video stream, sorted (demux only)."""
    stream = container.streams.video[0]
    base = float(stream.time_base or 0)
    times: list[float] = []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # flush packet
        if len(times) >= limits.max_video_decoded_frames:
            raise MediaError(f"video has more than {limits.max_video_decoded_frames} frames", status_code=413)
        pts = packet.pts if packet.pts is not None else packet.dts
        times.append(pts * base if pts is not None and base > 0 else float("nan"))
    if any(t != t for t in times):  # missing timestamps: assume a constant rate
        rate = float(stream.average_rate or stream.guessed_rate or 1)
        times = [i / rate for i in range(len(times))]
    return sorted(times)


def _frame_interval(times: list[float]) -> float:
    """Typical seconds between consecutive frames (median gap; 1.0 for a single frame)."""
    gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False) if b > a)
    return gaps[len(gaps) // 2] if gaps else 1.0


def sample_frame_indices(times: list[float], fps: float, max_frames: int) -> tuple[list[int], float]:
    """Indices (into sorted `times`) of frames sampled at `fps`, at most `max_frames`, and the effective fps.

    Frame i shows [times[i], times[i + 1]). The duration is split into `count` equal shares and each share
    keeps the frame on screen at its middle, so sampling at the native rate keeps every frame and a video
    longer than `max_frames / fps` seconds is covered uniformly from start to end.
    """
    duration = times[-1] - times[0] + _frame_interval(times)
    count = max(1, min(round(duration * fps), max_frames, len(times)))
    indices = []
    for k in range(count):
        middle = times[0] + (k + 0.5) * duration / count
        indices.append(max(0, bisect.bisect_right(times, middle) - 1))
    return indices, count / duration


def _decode_frames(
    container: av.container.InputContainer, indices: list[int], limits: MediaLimits
) -> list[Image.Image]:
    """RGB images of the frames at `indices` (presentation order), decoding no further than the last one."""
    wanted = set(indices)
    picked: dict[int, Image.Image] = {}
    for position, frame in enumerate(container.decode(container.streams.video[0])):
        if position >= limits.max_video_decoded_frames or position > indices[-1]:
            break
        _check_frame_pixels(frame.width, frame.height, limits)
        if position in wanted:
            picked[position] = frame.to_image().convert("RGB")
    frames = [picked[i] for i in indices if i in picked]
    if not frames:
        raise MediaError("video contains no decodable frames")
    return frames


def decode_video(
    data: bytes, limits: MediaLimits, fps: float | None = None, max_frames: int | None = None
) -> tuple[list[Image.Image], float]:
    """Sample RGB frames from an mp4/mov, webm/mkv, avi or gif video (blocking; use a thread).

    Returns (frames, effective fps); the frame count is even and >= 2. Stream dimensions and the frame
    count are checked before any frame is decoded.
    """
    fps = limits.default_video_fps if fps is None else fps
    cap = limits.max_video_frames if max_frames is None else min(max_frames, limits.max_video_frames)
    if not fps > 0 or cap < 1:
        raise MediaError("video fps must be positive and max_frames at least 1")
    container_format = sniff_video_container(data)
    if container_format is None:
        raise MediaError("unsupported video format (supported: mp4/mov, webm/mkv, avi, gif)")
    try:
        with av.open(io.BytesIO(data), format=container_format) as container:
            if not container.streams.video:
                raise MediaError("media has no video stream")
            codec = container.streams.video[0].codec_context
            _check_frame_pixels(codec.width, codec.height, limits)
            times = _frame_times(container, limits)
        if not times:
            raise MediaError("video contains no frames")
        indices, effective_fps = sample_frame_indices(times, fps, max(2, cap - cap % 2))
        with av.open(io.BytesIO(data), format=container_format) as container:
            frames = _decode_frames(container, indices, limits)
    except MediaError:
        raise
    except Exception as exc:  # FFmpeg raises many types on hostile input; all mean "bad video"
        raise MediaError("video data is truncated or corrupt") from exc
    if len(frames) % 2:
        frames.append(frames[-1].copy())
    return frames, effective_fps


async def fetch_video(
    url: str,
    limits: MediaLimits,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    param: str = "",
) -> VideoInput:
    """Load one video URL and sample RGB frames uniformly at `fps` (default `limits.default_video_fps`).

    At most `max_frames` frames (clamped to `limits.max_video_frames`) are kept; a longer video is sampled
    uniformly over its whole duration and the returned fps is the effective rate. The frame count is even
    and at least 2 (the last frame is repeated when needed). Raises MediaError (with `param` set).
    """
    try:
        data = await load_media_bytes(
            url, limits, max_bytes=limits.max_video_bytes, timeout_s=limits.fetch_timeout_video_s
        )
        frames, effective_fps = await asyncio.to_thread(decode_video, data, limits, fps, max_frames)
        return VideoInput(frames=frames, fps=effective_fps)
    except MediaError as exc:
        raise exc.with_param(param) from exc


# --------------------------------------------------------------------------------------------- CLI


def _csv_set(value: str) -> frozenset[str]:
    return frozenset(item.strip().lower() for item in value.split(",") if item.strip())


def add_media_args(parser: argparse.ArgumentParser) -> None:
    """Register the media limit flags (defaults from `MediaLimits()`)."""
    d = MediaLimits()
    g = parser.add_argument_group("media limits")
    g.add_argument(
        "--max-image-bytes", type=int, default=d.max_image_bytes, help="max encoded bytes per image"
    )
    g.add_argument(
        "--max-video-bytes", type=int, default=d.max_video_bytes, help="max encoded bytes per video"
    )
    g.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request)
    g.add_argument("--max-videos-per-request", type=int, default=d.max_videos_per_request)
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="max width*height")
    g.add_argument("--max-video-frames", type=int, default=d.max_video_frames, help="max sampled frames")
    g.add_argument("--max-video-frame-pixels", type=int, default=d.max_video_frame_pixels)
    g.add_argument("--max-video-decoded-frames", type=int, default=d.max_video_decoded_frames)
    g.add_argument("--default-video-fps", type=float, default=d.default_video_fps)
    g.add_argument("--media-fetch-timeout-image", type=float, default=d.fetch_timeout_image_s, help="seconds")
    g.add_argument("--media-fetch-timeout-video", type=float, default=d.fetch_timeout_video_s, help="seconds")
    g.add_argument("--max-media-redirects", type=int, default=d.max_redirects)
    g.add_argument(
        "--allowed-media-schemes",
        type=_csv_set,
        default=d.allowed_schemes,
        help="comma-separated subset of http,https,data (file: is enabled by --allowed-local-media-path)",
    )
    g.add_argument(
        "--allowed-media-domains",
        type=_csv_set,
        default=None,
        help='comma-separated host allowlist for media URLs; "*.example.com" matches subdomains (default: any)',
    )
    g.add_argument(
        "--allow-private-media-networks",
        action="store_true",
        help="allow media URLs resolving to loopback/private/link-local/reserved addresses (unsafe)",
    )
    g.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="serve file:// URLs and absolute paths, only from inside this directory (default: disabled)",
    )


def media_limits_from_args(args: argparse.Namespace) -> MediaLimits:
    """Build MediaLimits from parsed `add_media_args` flags; raises ValueError for invalid values."""
    unknown = set(args.allowed_media_schemes) - {"http", "https", "data"}
    if unknown:
        raise ValueError(f"--allowed-media-schemes: unsupported scheme(s) {sorted(unknown)}")
    limits = MediaLimits(
        max_image_bytes=args.max_image_bytes,
        max_video_bytes=args.max_video_bytes,
        max_images_per_request=args.max_images_per_request,
        max_videos_per_request=args.max_videos_per_request,
        max_image_pixels=args.max_image_pixels,
        max_video_frames=args.max_video_frames,
        max_video_frame_pixels=args.max_video_frame_pixels,
        max_video_decoded_frames=args.max_video_decoded_frames,
        default_video_fps=args.default_video_fps,
        fetch_timeout_image_s=args.media_fetch_timeout_image,
        fetch_timeout_video_s=args.media_fetch_timeout_video,
        max_redirects=args.max_media_redirects,
        allowed_schemes=frozenset(args.allowed_media_schemes),
        allowed_domains=args.allowed_media_domains,
        allow_private_networks=args.allow_private_media_networks,
        allowed_local_media_path=args.allowed_local_media_path,
    )
    _validate(limits)
    return limits


def _validate(limits: MediaLimits) -> None:
    counts = {
        "--max-image-bytes": limits.max_image_bytes,
        "--max-video-bytes": limits.max_video_bytes,
        "--max-image-pixels": limits.max_image_pixels,
        "--max-video-frames": limits.max_video_frames,
        "--max-video-frame-pixels": limits.max_video_frame_pixels,
        "--max-video-decoded-frames": limits.max_video_decoded_frames,
    }
    for flag, value in counts.items():
        if value < 1:
            raise ValueError(f"{flag} must be at least 1")
    if min(limits.max_images_per_request, limits.max_videos_per_request, limits.max_redirects) < 0:
        raise ValueError("media counts and --max-media-redirects must not be negative")
    if not (
        limits.default_video_fps > 0 and limits.fetch_timeout_image_s > 0 and limits.fetch_timeout_video_s > 0
    ):
        raise ValueError("--default-video-fps and media fetch timeouts must be positive")
    path = limits.allowed_local_media_path
    if path is not None and not os.path.isdir(path):
        raise ValueError(f"--allowed-local-media-path {path!r} is not a directory")
