"""Images and data:/file: URLs in api.media (no network)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import urllib.parse

import pytest
from media_helpers import png_declaring
from PIL import Image

from api.media import (
    MediaError,
    MediaLimits,
    add_media_args,
    decode_data_url,
    decode_image,
    fetch_image,
    media_limits_from_args,
)

LIMITS = MediaLimits()


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(width: int = 32, height: int = 24) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 7 % 256, y * 11 % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    return image


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _fetch(url: str, limits: MediaLimits = LIMITS, **kw) -> Image.Image:
    return asyncio.run(fetch_image(url, limits, **kw))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_lossless_formats_roundtrip_exactly(fmt):
    source = _gradient()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    image = _fetch(_data_url(_encode(source, fmt, **kw)))
    assert image.mode == "RGB" and image.size == source.size
    assert image.tobytes() == source.tobytes()


def test_jpeg_decodes_close_to_source():
    source = Image.new("RGB", (40, 30), (200, 40, 90))
    image = _fetch(_data_url(_encode(source, "JPEG", quality=95), "image/jpeg"))
    assert image.mode == "RGB" and image.size == (40, 30)
    r, g, b = image.getpixel((20, 15))
    assert abs(r - 200) < 6 and abs(g - 40) < 6 and abs(b - 90) < 6


def test_gif_first_frame_only():
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    blue = Image.new("RGB", (16, 16), (0, 0, 255))
    buf = io.BytesIO()
    red.save(buf, format="GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    image = _fetch(_data_url(buf.getvalue(), "image/gif"))
    assert image.mode == "RGB" and image.getpixel((8, 8)) == (255, 0, 0)


def test_transparent_png_composited_on_white():
    source = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    source.putpixel((0, 0), (10, 20, 30, 255))
    image = _fetch(_data_url(_encode(source, "PNG")))
    assert image.getpixel((0, 0)) == (10, 20, 30)
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_percent_encoded_data_url():
    png = _encode(_gradient(8, 8), "PNG")
    image = _fetch("data:image/png," + urllib.parse.quote_from_bytes(png))
    assert image.size == (8, 8)


def test_wrapped_base64_is_accepted():
    encoded = base64.b64encode(_encode(_gradient(8, 8), "PNG")).decode()
    wrapped = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))
    assert _fetch("data:image/png;base64," + wrapped).size == (8, 8)


def test_bad_base64_is_400_with_param():
    with pytest.raises(MediaError) as err:
        _fetch("data:image/png;base64,@@@not-base64@@@", param="messages[0].content[1].image_url")
    assert err.value.status_code == 400
    assert "base64" in err.value.message
    assert err.value.param == "messages[0].content[1].image_url"


def test_data_url_size_checked_before_decoding():
    payload = "A" * 4000  # declares 3000 bytes; invalid content would only be noticed while decoding
    with pytest.raises(MediaError) as err:
        decode_data_url("data:image/png;base64," + payload + "!", max_bytes=1000)
    assert err.value.status_code == 413


def test_data_url_over_limit_is_413():
    png = _encode(_gradient(64, 64), "PNG")
    with pytest.raises(MediaError) as err:
        _fetch(_data_url(png), MediaLimits(max_image_bytes=len(png) - 1))
    assert err.value.status_code == 413
    assert _fetch(_data_url(png), MediaLimits(max_image_bytes=len(png))).size == (64, 64)


def test_percent_encoded_over_limit_is_413():
    with pytest.raises(MediaError) as err:
        decode_data_url("data:text/plain," + "a" * 101, max_bytes=100)
    assert err.value.status_code == 413


def test_malformed_data_url():
    with pytest.raises(MediaError) as err:
        _fetch("data:image/png;base64")
    assert err.value.status_code == 400


@pytest.mark.parametrize(
    "payload",
    [b"GIF", b"just some text", b"\x00\x00\x01\x00ico-ish", b"II*\x00tiff-ish"],
)
def test_unsupported_format(payload):
    with pytest.raises(MediaError) as err:
        _fetch(_data_url(payload))
    assert err.value.status_code == 400 and "unsupported image format" in err.value.message


def test_pixel_bomb_rejected_before_decoding(monkeypatch):
    """5000x5000 declared, a few bytes of data: refused from the header, load() is never reached."""

    def fail_load(self):
        raise AssertionError("load() called on an oversized image")

    monkeypatch.setattr(Image.Image, "load", fail_load)
    from PIL import PngImagePlugin

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", fail_load)
    with pytest.raises(MediaError) as err:
        decode_image(png_declaring(5000, 5000), LIMITS)
    assert err.value.status_code == 413 and "too large" in err.value.message


def test_huge_declared_png_is_413():
    with pytest.raises(MediaError) as err:
        decode_image(png_declaring(20000, 20000), LIMITS)
    assert err.value.status_code == 413


def test_pixel_limit_boundary():
    png = _encode(_gradient(10, 10), "PNG")
    assert decode_image(png, MediaLimits(max_image_pixels=100)).size == (10, 10)
    with pytest.raises(MediaError):
        decode_image(png, MediaLimits(max_image_pixels=99))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_400(fmt):
    data = _encode(_gradient(64, 64), fmt)
    with pytest.raises(MediaError) as err:
        decode_image(data[: len(data) // 2], LIMITS)
    assert err.value.status_code == 400


def test_corrupt_png_header_is_400():
    data = bytearray(_encode(_gradient(8, 8), "PNG"))
    data[20] ^= 0xFF  # inside IHDR: CRC mismatch
    with pytest.raises(MediaError) as err:
        decode_image(bytes(data), LIMITS)
    assert err.value.status_code == 400


def test_disallowed_scheme():
    with pytest.raises(MediaError) as err:
        _fetch("ftp://example.com/a.png")
    assert err.value.status_code == 400
    with pytest.raises(MediaError):
        _fetch(_data_url(_encode(_gradient(4, 4), "PNG")), MediaLimits(allowed_schemes=frozenset({"https"})))


# ------------------------------------------------------------------------------------------ local files


@pytest.fixture
def media_dir(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    _gradient(12, 10).save(root / "a.png")
    outside = tmp_path / "secret.png"
    _gradient(12, 10).save(outside)
    (root / "link.png").symlink_to(outside)
    (root / "inner_link.png").symlink_to(root / "a.png")
    return root


def test_file_url_refused_without_allowed_path(media_dir):
    with pytest.raises(MediaError) as err:
        _fetch(f"file://{media_dir}/a.png")
    assert err.value.status_code == 400
    with pytest.raises(MediaError):
        _fetch(f"{media_dir}/a.png")


def test_file_url_inside_allowed_dir(media_dir):
    limits = MediaLimits(allowed_local_media_path=str(media_dir))
    assert _fetch(f"file://{media_dir}/a.png", limits).size == (12, 10)
    assert _fetch(f"{media_dir}/a.png", limits).size == (12, 10)
    assert _fetch(f"file://{media_dir}/inner_link.png", limits).size == (12, 10)


@pytest.mark.parametrize("name", ["../secret.png", "link.png", "../media/../secret.png"])
def test_file_outside_allowed_dir_refused(media_dir, name):
    limits = MediaLimits(allowed_local_media_path=str(media_dir))
    with pytest.raises(MediaError) as err:
        _fetch(f"file://{media_dir}/{name}", limits)
    assert err.value.status_code == 400 and "outside" in err.value.message


def test_sibling_dir_with_common_prefix_refused(tmp_path, media_dir):
    sibling = tmp_path / "media2"
    sibling.mkdir()
    _gradient(4, 4).save(sibling / "b.png")
    limits = MediaLimits(allowed_local_media_path=str(media_dir))
    with pytest.raises(MediaError):
        _fetch(f"file://{sibling}/b.png", limits)


def test_local_file_size_limit_and_non_regular(media_dir):
    size = (media_dir / "a.png").stat().st_size
    with pytest.raises(MediaError) as err:
        _fetch(
            f"file://{media_dir}/a.png",
            MediaLimits(allowed_local_media_path=str(media_dir), max_image_bytes=size - 1),
        )
    assert err.value.status_code == 413
    with pytest.raises(MediaError) as err:
        _fetch(f"file://{media_dir}", MediaLimits(allowed_local_media_path=str(media_dir)))
    assert err.value.status_code == 400
    with pytest.raises(MediaError):
        _fetch(f"file://{media_dir}/missing.png", MediaLimits(allowed_local_media_path=str(media_dir)))


def test_file_url_with_remote_host_refused(media_dir):
    with pytest.raises(MediaError):
        _fetch(f"file://evil.example{media_dir}/a.png", MediaLimits(allowed_local_media_path=str(media_dir)))


# ------------------------------------------------------------------------------------------ CLI flags


def test_cli_flags_roundtrip(tmp_path):
    parser = argparse.ArgumentParser()
    add_media_args(parser)
    assert media_limits_from_args(parser.parse_args([])) == MediaLimits()
    args = parser.parse_args(
        [
            "--max-image-bytes=1000",
            "--max-video-frames=8",
            "--allowed-media-domains=Example.com,*.cdn.example",
            "--allowed-media-schemes=https,data",
            "--allow-private-media-networks",
            f"--allowed-local-media-path={tmp_path}",
        ]
    )
    limits = media_limits_from_args(args)
    assert limits.max_image_bytes == 1000 and limits.max_video_frames == 8
    assert limits.allowed_domains == frozenset({"example.com", "*.cdn.example"})
    assert limits.allowed_schemes == frozenset({"https", "data"})
    assert limits.allow_private_networks and limits.allowed_local_media_path == str(tmp_path)


@pytest.mark.parametrize(
    "argv",
    [
        ["--allowed-media-schemes=http,gopher"],
        ["--max-image-pixels=0"],
        ["--allowed-local-media-path=/nonexistent/x"],
    ],
)
def test_cli_rejects_bad_values(argv):
    parser = argparse.ArgumentParser()
    add_media_args(parser)
    with pytest.raises(ValueError):
        media_limits_from_args(parser.parse_args(argv))
