"""Tests for wanpipe.media: format choice, encode / decode round trips, validation, atomic writes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
import pytest
from PIL import Image

from wanpipe import media
from wanpipe.media import OUTPUT_FORMATS, Video, output_format_for, read_image, read_video

F, H, W = 9, 48, 64
T = TypeVar("T")


def make_frames(num_frames: int = F, height: int = H, width: int = W) -> np.ndarray:
    """A smooth gradient background with a bright square moving across it, float32 in [0, 1]."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    frames = np.empty((num_frames, height, width, 3), dtype=np.float32)
    for t in range(num_frames):
        frames[t, ..., 0] = x
        frames[t, ..., 1] = y
        frames[t, ..., 2] = 0.5 * (x + y) * (t + 1) / num_frames
        top, left = (2 * t) % max(height - 12, 1), (5 * t) % max(width - 12, 1)
        frames[t, top : top + 12, left : left + 12] = (1.0, 0.9, 0.1)
    return frames


@pytest.fixture(scope="module")
def video() -> Video:
    return Video(make_frames(), fps=16)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------
# Video


def test_video_properties_and_to_uint8() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.2, 1.2, size=(3, 5, 7, 3))  # float64, out of range on both sides
    v = Video(x, fps=24)
    assert v.frames.dtype == np.float32
    assert (v.num_frames, v.height, v.width, v.fps) == (3, 5, 7, 24.0)
    expected = (np.clip(x.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(v.to_uint8(), expected)
    assert v.to_uint8().dtype == np.uint8


def test_to_uint8_rounds_half_values() -> None:
    x = np.array([0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0], dtype=np.float32).reshape(1, 1, 5, 1).repeat(3, -1)
    np.testing.assert_array_equal(
        Video(x, 16).to_uint8()[0, 0, :, 0], (np.clip(x, 0, 1) * 255).round()[0, 0, :, 0]
    )


@pytest.mark.parametrize(
    ("frames", "error", "match"),
    [
        (np.zeros((4, 5, 3), np.float32), ValueError, r"\(F, H, W, 3\).*frames\[None\]"),
        (np.zeros((1, 4, 5, 4), np.float32), ValueError, "3 \\(RGB\\) channels"),
        (np.zeros((0, 4, 5, 3), np.float32), ValueError, "non-empty"),
        (np.zeros((1, 4, 5, 3), np.uint8), TypeError, "float.*from_uint8"),
        (np.full((1, 4, 5, 3), np.nan, np.float32), ValueError, "NaN"),
        (np.full((1, 4, 5, 3), np.inf, np.float32), ValueError, "infinite"),
        ([[[[0.0, 0.0, 0.0]]]], TypeError, "numpy array"),
    ],
)
def test_bad_frames_refused(frames: np.ndarray, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Video(frames, fps=16)


@pytest.mark.parametrize("fps", [0, -1, float("nan"), float("inf")])
def test_bad_fps_refused(fps: float) -> None:
    with pytest.raises(ValueError, match="fps"):
        Video(make_frames(1, 4, 4), fps=fps)


def test_from_uint8() -> None:
    u8 = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    np.testing.assert_array_equal(Video.from_uint8(u8, 16).to_uint8(), u8)


# ---------------------------------------------------------------------------------------------------------
# Format choice


@pytest.mark.parametrize(
    ("name", "num_frames", "expected"),
    [
        ("a.mp4", 9, "mp4"),
        ("a.MP4", 9, "mp4"),
        ("a.webp", 9, "webp"),
        ("a.gif", 9, "gif"),
        ("frames", 9, "png-folder"),
        ("a.png", 1, "png"),
        ("a.jpg", 1, "jpg"),
        ("a.jpeg", 1, "jpg"),
        ("a.mp4", 1, "mp4"),
    ],
)
def test_output_format_for(tmp_path: Path, name: str, num_frames: int, expected: str) -> None:
    assert output_format_for(tmp_path / name, num_frames) == expected
    assert expected in OUTPUT_FORMATS


def test_output_format_explicit_and_existing_dir(tmp_path: Path) -> None:
    (tmp_path / "out.v2").mkdir()
    assert output_format_for(tmp_path / "out.v2", 9) == "png-folder"
    assert output_format_for(tmp_path / "clip", 9, format="mp4") == "mp4"
    assert output_format_for(tmp_path / "x.bin", 9, format="png-folder") == "png-folder"
    assert output_format_for(tmp_path / "x", 1, format="JPEG") == "jpg"
    with pytest.raises(ValueError, match="unknown output format 'avi'.*mp4"):
        output_format_for(tmp_path / "x", 9, format="avi")


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.jpeg"])
def test_single_image_formats_refuse_several_frames(tmp_path: Path, video: Video, name: str) -> None:
    with pytest.raises(ValueError, match=r"9 frames.*video format.*folder"):
        output_format_for(tmp_path / name, 9)
    with pytest.raises(ValueError, match="video format"):
        video.save(tmp_path / name)
    assert listing(tmp_path) == []


def test_unknown_extension_lists_formats(tmp_path: Path, video: Video) -> None:
    with pytest.raises(ValueError, match=r"'\.avi'") as info:
        video.save(tmp_path / "clip.avi")
    message = str(info.value)
    for suffix in (".mp4", ".webp", ".gif", ".png", ".jpg", "no suffix"):
        assert suffix in message
    assert listing(tmp_path) == []


def test_bad_options_refused(tmp_path: Path, video: Video) -> None:
    with pytest.raises(ValueError, match="crf"):
        video.save(tmp_path / "a.mp4", crf=60)
    with pytest.raises(ValueError, match="quality"):
        video.save(tmp_path / "a.webp", quality=101)
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# Round trips


def test_mp4_round_trip(tmp_path: Path, video: Video) -> None:
    out = video.save(tmp_path / "sub" / "dir" / "clip.mp4")  # parents are created
    assert out == tmp_path / "sub" / "dir" / "clip.mp4"
    frames, fps = read_video(out)
    assert frames.dtype == np.uint8
    assert frames.shape == (F, H, W, 3)
    assert fps == pytest.approx(16.0)
    err = np.abs(frames.astype(np.int16) - video.to_uint8().astype(np.int16))
    assert err.mean() < 3.5  # mostly 4:2:0 chroma on sharp colour edges
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert listing(out.parent) == ["clip.mp4"]


def test_mp4_fractional_fps(tmp_path: Path) -> None:
    out = Video(make_frames(3, 16, 16), fps=24000 / 1001).save(tmp_path / "a.mp4")
    frames, fps = read_video(out)
    assert len(frames) == 3
    assert fps == pytest.approx(24000 / 1001, rel=1e-4)


def test_mp4_odd_size_is_padded_by_edge_replication(tmp_path: Path) -> None:
    frames = make_frames(5, 33, 47)
    video = Video(frames, fps=24)
    decoded, fps = read_video(video.save(tmp_path / "odd.mp4"))
    assert decoded.shape == (5, 34, 48, 3)
    assert fps == pytest.approx(24.0)
    assert np.abs(decoded[:, :33, :47].astype(np.int16) - video.to_uint8()).mean() < 5.0
    # the added bottom row and right column repeat the edge (up to the lossy codec)
    as_int = decoded.astype(np.int16)
    assert np.abs(as_int[:, 33, :47] - as_int[:, 32, :47]).mean() < 6.0
    assert np.abs(as_int[:, :33, 47] - as_int[:, :33, 46]).mean() < 6.0


@pytest.mark.parametrize("lossless", [True, False])
def test_webp_round_trip(tmp_path: Path, video: Video, lossless: bool) -> None:
    out = video.save(tmp_path / "clip.webp", lossless=lossless)
    frames, fps = read_video(out)
    assert frames.shape == (F, H, W, 3)
    assert fps == pytest.approx(16.0, rel=0.01)
    if lossless:
        np.testing.assert_array_equal(frames, video.to_uint8())
    else:
        assert np.abs(frames.astype(np.int16) - video.to_uint8()).mean() < 4.0


def test_gif_round_trip(tmp_path: Path, video: Video) -> None:
    out = video.save(tmp_path / "clip.gif")
    frames, fps = read_video(out)
    assert frames.shape == (F, H, W, 3)
    assert fps == pytest.approx(16.0, rel=0.05)  # 10 ms steps
    assert np.abs(frames.astype(np.int16) - video.to_uint8()).mean() < 6.0
    with Image.open(out) as image:
        durations = []
        for i in range(image.n_frames):
            image.seek(i)
            durations.append(image.info["duration"])
    assert set(durations) <= {60, 70}
    assert sum(durations) == 560  # round(9 / 16 s, 10 ms)


def test_frame_durations_keep_total_exact() -> None:
    assert media._frame_durations_ms(8, 16, 10) == [60, 60, 70, 60, 60, 70, 60, 60]  # 500 ms in all
    assert sum(media._frame_durations_ms(81, 16, 10)) == 5060
    assert sum(media._frame_durations_ms(121, 24, 1)) == 5042
    assert min(media._frame_durations_ms(10, 1000, 10)) == 10


def test_png_folder_round_trip(tmp_path: Path, video: Video) -> None:
    out = video.save(tmp_path / "frames")
    assert out.is_dir()
    names = listing(out)
    assert names == [f"frame_{i:05d}.png" for i in range(F)]
    decoded = np.stack([read_image(out / name) for name in names])
    np.testing.assert_array_equal(decoded, video.to_uint8())
    assert listing(tmp_path) == ["frames"]


def test_png_folder_overwrite_rules(tmp_path: Path, video: Video) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    video.save(empty)  # an existing empty folder is fine
    assert len(listing(empty)) == F

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        video.save(full)
    assert listing(full) == ["keep.txt"]

    video.save(full, overwrite=True)  # replaced as a whole
    assert listing(full) == [f"frame_{i:05d}.png" for i in range(F)]

    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="file with that name"):
        video.save(tmp_path / "afile", format="png-folder")
    assert listing(tmp_path) == ["afile", "empty", "full"]


@pytest.mark.parametrize("name", ["one.png", "one.jpg", "one.jpeg"])
def test_single_frame_images(tmp_path: Path, name: str) -> None:
    video = Video(make_frames(1), fps=16)
    out = video.save(tmp_path / name)
    image = read_image(out)
    assert image.shape == (H, W, 3)
    if name.endswith(".png"):
        np.testing.assert_array_equal(image, video.to_uint8()[0])
    else:
        assert np.abs(image.astype(np.int16) - video.to_uint8()[0]).mean() < 3.0
    with Image.open(out) as pil:
        assert pil.format == ("PNG" if name.endswith(".png") else "JPEG")


def test_file_destination_overwritten(tmp_path: Path, video: Video) -> None:
    dest = tmp_path / "clip.gif"
    dest.write_bytes(b"old")
    video.save(dest)
    assert read_video(dest)[0].shape == (F, H, W, 3)
    assert listing(tmp_path) == ["clip.gif"]


def test_file_format_onto_directory_refused(tmp_path: Path, video: Video) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        video.save(tmp_path / "d", format="mp4")


# ---------------------------------------------------------------------------------------------------------
# Atomicity: the encoder fails after a few frames


class Boom(RuntimeError):
    pass


def fail_after(n: int, fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap ``fn`` so that calls after the ``n``-th raise Boom (an encoder dying mid-write)."""
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> T:
        nonlocal calls
        calls += 1
        if calls > n:
            raise Boom("encoder failed")
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webp", "clip.gif", "frames"])
@pytest.mark.parametrize("existed", [False, True])
def test_failed_write_leaves_destination_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, video: Video, name: str, existed: bool
) -> None:
    dest = tmp_path / name
    if existed:
        if name == "frames":
            dest.mkdir()
            (dest / "old.txt").write_text("old")
        else:
            dest.write_bytes(b"old content")
    if name.endswith(".mp4"):
        monkeypatch.setattr(av.VideoFrame, "from_ndarray", fail_after(4, av.VideoFrame.from_ndarray))
    else:
        monkeypatch.setattr(media.Image, "fromarray", fail_after(4, Image.fromarray))

    with pytest.raises(Boom):
        video.save(dest, overwrite=True)

    if not existed:
        assert listing(tmp_path) == []
    elif name == "frames":
        assert listing(tmp_path) == ["frames"]
        assert listing(dest) == ["old.txt"]
    else:
        assert listing(tmp_path) == [name]
        assert dest.read_bytes() == b"old content"


def test_failed_rename_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, video: Video) -> None:
    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(media.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        video.save(tmp_path / "clip.gif")
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# Readers


def test_read_image_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.png")), rgb)
    np.testing.assert_array_equal(read_image(Image.fromarray(rgb)), rgb)
    np.testing.assert_array_equal(read_image(rgb), rgb)

    x = rng.uniform(0, 1, size=(6, 5, 3))
    np.testing.assert_array_equal(read_image(x), (x * 255).round().astype(np.uint8))

    rgba = np.concatenate([rgb, np.full((6, 5, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(read_image(Image.fromarray(rgba, mode="RGBA")), rgb)
    np.testing.assert_array_equal(read_image(rgba), rgb)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)

    grey = rgb[..., 0]
    np.testing.assert_array_equal(
        read_image(Image.fromarray(grey, mode="L")), np.repeat(grey[..., None], 3, -1)
    )
    np.testing.assert_array_equal(read_image(grey), np.repeat(grey[..., None], 3, -1))


def test_read_image_applies_exif_orientation(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg").shape == (6, 4, 3)


def test_read_image_errors(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match=r"cannot read image .*corrupt\.png"):
        read_image(bad)
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 3).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"truncated\.png"):
        read_image(truncated)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        read_image(np.full((2, 2, 3), 2.0))
    with pytest.raises(ValueError, match="shape"):
        read_image(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(TypeError, match="dtype"):
        read_image(np.zeros((2, 2, 3), np.int32))
    with pytest.raises(TypeError, match="path, PIL image or numpy array"):
        read_image(42)  # type: ignore[arg-type]


def test_read_video_errors(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50)
    with pytest.raises(ValueError, match=r"cannot read video .*corrupt\.mp4"):
        read_video(bad)
    with pytest.raises(FileNotFoundError, match=r"nope\.mp4"):
        read_video(tmp_path / "nope.mp4")
