"""Video decoding and frame sampling in api.media, on videos generated here with PyAV."""

from __future__ import annotations

import asyncio
import base64
import io
from fractions import Fraction

import av
import pytest
from PIL import Image

from api.media import MediaError, MediaLimits, decode_video, fetch_video, sample_frame_indices

LIMITS = MediaLimits()


def _frame_image(index: int, width: int, height: int) -> Image.Image:
    """Frame `index` is a flat gray of level 8*index, so a decoded frame tells which source frame it was."""
    return Image.new("RGB", (width, height), (8 * index,) * 3)


def _make_video(
    seconds: float = 3.0,
    rate: int = 10,
    width: int = 64,
    height: int = 48,
    fmt: str = "mp4",
    codec: str = "",
) -> bytes:
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, rate)
        # (near-)lossless so each frame's gray level survives the round trip
        stream.options = {"qp": "0"} if codec == "libx264" else {"qscale": "1"}
        for i in range(round(seconds * rate)):
            frame = av.VideoFrame.from_image(_frame_image(i, width, height))
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def _source_index(image: Image.Image) -> int:
    """Which generated frame a decoded image shows (from its mean gray level)."""
    level = sum(image.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))) / 3
    return round(level / 8)


@pytest.fixture(scope="module")
def video_3s() -> bytes:
    return _make_video()


def _data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def test_sampled_at_2fps(video_3s):
    result = asyncio.run(fetch_video(_data_url(video_3s), LIMITS))
    assert len(result.frames) == 6
    assert result.fps == pytest.approx(2.0)
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in result.frames)
    indices = [_source_index(f) for f in result.frames]
    # Each kept frame is the one nearest the middle of its half-second: 0.25 s, 0.75 s, ... at 10 fps.
    assert all(abs(i - expected) <= 1 for i, expected in zip(indices, [2, 7, 12, 17, 22, 27], strict=True))
    assert indices == sorted(indices)


def test_requested_fps(video_3s):
    frames, fps = decode_video(video_3s, LIMITS, fps=4.0)
    assert len(frames) == 12 and fps == pytest.approx(4.0)


def test_max_frames_spreads_over_whole_video(video_3s):
    frames, fps = decode_video(video_3s, LIMITS, fps=10.0, max_frames=4)
    assert len(frames) == 4
    assert fps == pytest.approx(4 / 3.0)
    indices = [_source_index(f) for f in frames]
    assert indices[0] <= 5 and indices[-1] >= 24  # covers start to end, not just the first 0.4 s


def test_server_cap_clamps_request(video_3s):
    frames, _ = decode_video(video_3s, MediaLimits(max_video_frames=6), fps=10.0, max_frames=100)
    assert len(frames) == 6


def test_odd_count_padded_to_even(video_3s):
    frames, fps = decode_video(video_3s, LIMITS, fps=1.0)  # 3 samples -> last repeated
    assert len(frames) == 4
    assert fps == pytest.approx(1.0)
    assert frames[3].tobytes() == frames[2].tobytes()


def test_single_frame_video_gives_two_frames():
    frames, _ = decode_video(_make_video(seconds=0.1), LIMITS)
    assert len(frames) == 2


def test_native_rate_not_exceeded(video_3s):
    frames, fps = decode_video(video_3s, LIMITS, fps=30.0, max_frames=64)
    assert len(frames) == 30 and fps == pytest.approx(10.0)
    assert [_source_index(f) for f in frames] == list(range(30))


def test_webm_vp9():
    frames, _ = decode_video(_make_video(seconds=2.0, fmt="webm", codec="libvpx-vp9"), LIMITS)
    assert len(frames) == 4


def test_frame_pixel_limit_checked_before_decoding(video_3s):
    with pytest.raises(MediaError) as err:
        decode_video(video_3s, MediaLimits(max_video_frame_pixels=64 * 48 - 1))
    assert err.value.status_code == 413


def test_decoded_frame_limit(video_3s):
    with pytest.raises(MediaError) as err:
        decode_video(video_3s, MediaLimits(max_video_decoded_frames=29))
    assert err.value.status_code == 413
    assert len(decode_video(video_3s, MediaLimits(max_video_decoded_frames=30))[0]) == 6


def test_video_byte_limit(video_3s):
    with pytest.raises(MediaError) as err:
        asyncio.run(
            fetch_video(_data_url(video_3s), MediaLimits(max_video_bytes=len(video_3s) - 1), param="v")
        )
    assert err.value.status_code == 413 and err.value.param == "v"


@pytest.mark.parametrize("cut", [0.02, 0.3])
def test_corrupt_video_is_400(video_3s, cut):
    with pytest.raises(MediaError) as err:
        decode_video(video_3s[: int(len(video_3s) * cut)], LIMITS)
    assert err.value.status_code == 400


def test_garbage_after_valid_header_is_400(video_3s):
    data = video_3s[:32] + bytes(range(256)) * 40
    with pytest.raises(MediaError) as err:
        decode_video(data, LIMITS)
    assert err.value.status_code == 400


def test_unknown_container_is_400():
    with pytest.raises(MediaError) as err:
        decode_video(b"#EXTM3U\n#EXT-X-TARGETDURATION:1\nfile:///etc/passwd\n", LIMITS)
    assert err.value.status_code == 400 and "unsupported video format" in err.value.message


def test_bad_sampling_arguments(video_3s):
    with pytest.raises(MediaError):
        decode_video(video_3s, LIMITS, fps=0.0)
    with pytest.raises(MediaError):
        decode_video(video_3s, LIMITS, max_frames=0)


def test_local_video_file(tmp_path, video_3s):
    (tmp_path / "clip.mp4").write_bytes(video_3s)
    limits = MediaLimits(allowed_local_media_path=str(tmp_path))
    result = asyncio.run(fetch_video(f"file://{tmp_path}/clip.mp4", limits, fps=2.0, max_frames=4))
    assert len(result.frames) == 4


def test_sample_indices_math():
    times = [i / 10 for i in range(30)]
    indices, fps = sample_frame_indices(times, fps=2.0, max_frames=64)
    assert indices == [2, 7, 12, 17, 22, 27]
    assert fps == pytest.approx(2.0)
    indices, fps = sample_frame_indices(times, fps=2.0, max_frames=3)
    assert len(indices) == 3 and fps == pytest.approx(1.0)
    assert indices[0] in (4, 5) and indices[1] in (14, 15) and indices[2] in (24, 25)
    assert sample_frame_indices(times, fps=10.0, max_frames=64)[0] == list(range(30))
    assert sample_frame_indices([0.0], fps=2.0, max_frames=64) == ([0], 1.0)


def test_animated_gif_as_video():
    images = [_frame_image(i, 16, 16) for i in range(8)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=250, loop=0)
    frames, fps = decode_video(buf.getvalue(), LIMITS)  # 8 frames x 0.25 s = 2 s at 2 fps -> 4 frames
    assert len(frames) == 4 and fps == pytest.approx(2.0)
    assert [_source_index(f) for f in frames] == [1, 3, 5, 7]
