"""Video and image encode / decode: the last step of the data path (frames -> media file).

The pipeline hands over frames as float32 ``(F, H, W, 3)`` in [0, 1] plus an fps; :class:`Video` holds them,
:meth:`Video.save` writes them in the format chosen by :func:`output_format_for`, and :func:`read_video` /
:func:`read_image` read media back (tests, video-to-video, image-to-video).

Decisions:

* 8-bit conversion is ``(clip(x, 0, 1) * 255).round()``, as diffusers' ``numpy_to_pil``.
* ``.mp4`` is H.264 (libx264) yuv420p, crf 18 (visually lossless), preset ``medium``, ``+faststart``.
  RGB -> YUV uses FFmpeg's default (BT.601, limited range, untagged), the same as diffusers'
  ``export_to_video``; :func:`read_video` uses the same matrix, so a round trip is consistent.
* 4:2:0 needs an even width and height: odd sizes are padded by one row / column that repeats the edge
  (bottom / right), so the mp4 is at most one pixel larger than the frames. Wan's sizes are multiples of 16,
  so this only matters for other callers. Every other format keeps the exact size.
* Animated GIF and WebP store per-frame durations in 10 ms / 1 ms steps: each frame's duration is rounded
  on the cumulative timeline, so the total length is exact (a 16 fps GIF mixes 60 and 70 ms frames). Both
  encoders merge a frame identical to the one before into it (longer duration), so they can hold fewer
  frames than the video.
* Files are written through :class:`~wanpipe.video_writer.VideoWriter`, the streaming sink the CLI and
  the server hand the frames to chunk by chunk as they are decoded (:mod:`wanpipe.video_writer`).
* No half-written output: a file is written to a hidden temporary file in the destination's directory
  and moved into place with ``os.replace`` after the encoder finished (an existing file is replaced
  atomically); a PNG folder is written to a hidden temporary sibling folder and renamed into place. An
  existing non-empty folder is refused unless ``overwrite=True``, which replaces the folder as a whole.
  On any error the temporary is removed and the destination is left as it was.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wanpipe import video_writer as video_writer_module
from wanpipe.video_writer import VideoWriter, frame_durations_ms, temp_sibling

__all__ = [
    "OUTPUT_FORMATS",
    "Video",
    "encode_webp",
    "output_format_for",
    "read_image",
    "read_video",
    "write_atomic",
    "video_writer",
]

# Formats Video.save writes. "png" and "jpg" are single images (one frame only).
OUTPUT_FORMATS: tuple[str, ...] = ("mp4", "webp", "gif", "png-folder", "png", "jpg")

_SUFFIX_FORMATS: dict[str, str] = {
    ".mp4": "mp4",
    ".webp": "webp",
    ".gif": "gif",
    ".png": "png",
    ".jpg": "jpg",
    ".jpeg": "jpg",
}
_FORMAT_ALIASES: dict[str, str] = {"jpeg": "jpg", "png_folder": "png-folder", "folder": "png-folder"}
_SINGLE_IMAGE_FORMATS = frozenset({"png", "jpg"})
_PILLOW_VIDEO_SUFFIXES = frozenset({".gif", ".webp"})

PathLike = str | os.PathLike[str]


def _allowed_formats_text() -> str:
    suffixes = ", ".join(_SUFFIX_FORMATS)
    return f"{suffixes} (png/jpg: one frame only), or a path with no suffix / an existing folder for a folder of PNGs"


def output_format_for(path: PathLike, num_frames: int, format: str | None = None) -> str:
    """Return the output format (one of ``OUTPUT_FORMATS``) for writing ``num_frames`` frames to ``path``.

    An explicit ``format`` wins over the suffix. Otherwise: an existing directory or a path with no suffix
    is a PNG folder, and the suffix picks the rest. ``png`` / ``jpg`` take exactly one frame.
    """
    if num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_frames}")
    path = Path(path)
    if format is not None:
        fmt = format.lower().lstrip(".")
        fmt = _FORMAT_ALIASES.get(fmt, fmt)
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"unknown output format {format!r}; expected one of {', '.join(OUTPUT_FORMATS)}")
    elif path.is_dir() or path.suffix == "":
        fmt = "png-folder"
    else:
        suffix = path.suffix.lower()
        if suffix not in _SUFFIX_FORMATS:
            raise ValueError(
                f"cannot tell the output format of {str(path)!r} from its suffix {path.suffix!r}; "
                f"use {_allowed_formats_text()}, or pass format= (one of {', '.join(OUTPUT_FORMATS)})"
            )
        fmt = _SUFFIX_FORMATS[suffix]
    if fmt in _SINGLE_IMAGE_FORMATS and num_frames != 1:
        raise ValueError(
            f"{fmt} holds a single image but the video has {num_frames} frames; "
            "use a video format (.mp4, .webp, .gif) or a folder of PNGs (a path with no suffix)"
        )
    return fmt


def _check_frames(frames: np.ndarray) -> np.ndarray:
    """Validate a (F, H, W, 3) float array and return it as float32."""
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.ndim != 4:
        hint = " (for a single image use frames[None])" if frames.ndim == 3 else ""
        raise ValueError(f"frames must have shape (F, H, W, 3), got shape {frames.shape}{hint}")
    if frames.shape[-1] != 3:
        raise ValueError(f"frames must have 3 (RGB) channels in the last dim, got shape {frames.shape}")
    if min(frames.shape[:3]) < 1:
        raise ValueError(f"frames must be non-empty, got shape {frames.shape}")
    if not np.issubdtype(frames.dtype, np.floating):
        raise TypeError(
            f"frames must be a float array in [0, 1], got dtype {frames.dtype} "
            "(for uint8 frames use Video.from_uint8)"
        )
    frames = np.asarray(frames, dtype=np.float32)
    if not np.isfinite(frames).all():
        raise ValueError("frames contain NaN or infinite values")
    return frames


def _float_to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


@dataclass(eq=False)
class Video:
    """Frames ``(F, H, W, 3)`` float32 in [0, 1] (values outside are clipped when encoded) and their fps."""

    frames: np.ndarray
    fps: float
    seed: int | None = None  # the seed that drew the initial noise, when a pipeline made the video
    timings: dict[str, float] | None = None  # seconds per stage, when a pipeline made the video
    decoder: str | None = None  # what decoded it, when a pipeline made it: "vae" or "tiny" (TAEHV)

    def __post_init__(self) -> None:
        self.frames = _check_frames(self.frames)
        fps = float(self.fps)
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {self.fps!r}")
        self.fps = fps

    @classmethod
    def from_uint8(cls, frames: np.ndarray, fps: float) -> Video:
        """Build a Video from uint8 frames ``(F, H, W, 3)`` (as returned by :func:`read_video`)."""
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
            raise TypeError(f"expected a uint8 numpy array, got {getattr(frames, 'dtype', type(frames))}")
        return cls(frames.astype(np.float32) / 255.0, fps)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    def to_uint8(self) -> np.ndarray:
        """``(F, H, W, 3)`` uint8: ``(clip(frames, 0, 1) * 255).round()``."""
        return _float_to_uint8(self.frames)

    def save(
        self,
        path: PathLike,
        *,
        format: str | None = None,
        crf: int = 18,
        preset: str = "medium",
        quality: int = 95,
        lossless: bool = False,
        loop: int = 0,
        overwrite: bool = False,
    ) -> Path:
        """Write the video to ``path`` and return the path written.

        The format comes from ``format`` or the path (see :func:`output_format_for`); the frames go
        through a :class:`~wanpipe.video_writer.VideoWriter` a few at a time (no whole uint8 copy).

        Args:
            crf: mp4 quality, 0 (lossless) to 51; 18 is visually lossless.
            preset: libx264 speed / size trade-off (``ultrafast`` ... ``veryslow``).
            quality: 0-100 for lossy WebP and JPEG.
            lossless: lossless WebP.
            loop: GIF / WebP loop count, 0 = forever.
            overwrite: replace an existing non-empty folder (PNG folder output). Files are always replaced.
        """
        writer = video_writer(
            path,
            self.fps,
            self.num_frames,
            format=format,
            crf=crf,
            preset=preset,
            quality=quality,
            lossless=lossless,
            loop=loop,
            overwrite=overwrite,
        )
        writer.open(self.height, self.width)
        try:
            for start in range(0, self.num_frames, _SAVE_CHUNK):
                writer.write(_float_to_uint8(self.frames[start : start + _SAVE_CHUNK]))
        except BaseException:
            writer.abort()
            raise
        return writer.close()


_SAVE_CHUNK = 8  # frames converted to uint8 at a time by Video.save


def video_writer(
    path: PathLike, fps: float, num_frames: int, format: str | None = None, **options: Any
) -> VideoWriter:
    """A :class:`~wanpipe.video_writer.VideoWriter` (a streaming :class:`~wanpipe.video_writer.FrameSink`)
    for ``num_frames`` frames at ``fps`` to ``path``, in the format :func:`output_format_for` picks;
    ``options``: :meth:`Video.save`'s (crf, preset, quality, lossless, loop, overwrite)."""
    fps = float(fps)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return VideoWriter(path, fps, output_format_for(path, num_frames, format), **options)


_frame_durations_ms = frame_durations_ms  # the name the tests know
_av = video_writer_module._av


def encode_webp(frames: np.ndarray, fps: float, *, quality: int = 80) -> bytes:
    """Frames (F, H, W, 3) uint8 -> an animated WebP (lossy, ``quality`` 0-100, looping) played at
    ``fps``, as bytes (live previews: :class:`wanpipe.context.Preview`; served and written as they are).
    libwebp's fastest method (0): ~3x faster than its default (4) for about the same size."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"frames must be (F, H, W, 3) uint8 with F >= 1, got {frames.shape} {frames.dtype}")
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps}")
    images = [Image.fromarray(frame) for frame in frames]
    out = io.BytesIO()
    durations = _frame_durations_ms(len(images), fps, 1)
    images[0].save(
        out,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=durations,
        loop=0,
        quality=quality,
        method=0,
    )
    return out.getvalue()


def write_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a hidden temporary sibling renamed over it (``os.replace``): a
    reader sees the old file or the new one, never half of one (no fsync: for files rewritten often, as
    the CLI's ``--preview``). Returns the path."""
    dest = Path(path)
    tmp = temp_sibling(dest)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


# ---------------------------------------------------------------------------------------------------------
# Readers


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a {what} file, got a directory: {str(path)!r}")


def _read_video_pyav(path: Path) -> tuple[np.ndarray, float]:
    av = _av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not frames:
        raise ValueError("no frames")
    return np.stack(frames), float(rate) if rate else 0.0


def _read_video_pillow(path: Path) -> tuple[np.ndarray, float]:
    frames: list[np.ndarray] = []
    total_ms = 0.0
    with Image.open(path) as image:
        for i in range(getattr(image, "n_frames", 1)):
            image.seek(i)
            frames.append(np.asarray(image.convert("RGB")))
            total_ms += float(image.info.get("duration") or 0)
    return np.stack(frames), len(frames) * 1000.0 / total_ms if total_ms > 0 else 0.0


def read_video(path: PathLike) -> tuple[np.ndarray, float]:
    """Read a video file into ``(frames uint8 (F, H, W, 3), fps)``.

    GIF and WebP are read with Pillow (FFmpeg does not decode animated WebP), everything else with PyAV,
    falling back to Pillow. fps is the average rate; 0.0 when the file stores no timing.
    """
    path = Path(path)
    _check_readable(path, "video")
    readers = [_read_video_pyav, _read_video_pillow]
    if path.suffix.lower() in _PILLOW_VIDEO_SUFFIXES:
        readers.reverse()
    errors: list[str] = []
    for reader in readers:
        try:
            return reader(path)
        except (_av().error.FFmpegError, UnidentifiedImageError, OSError, ValueError, EOFError) as e:
            errors.append(f"{e}")
    raise ValueError(f"cannot read video {str(path)!r}: {'; '.join(errors)}")


def _image_array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"image array must have shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    array = array[..., :3]
    if min(array.shape[:2]) < 1:
        raise ValueError(f"image array is empty: shape {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image array contains NaN or infinite values")
        lo, hi = float(array.min()), float(array.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float image array must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        return _float_to_uint8(array)
    raise TypeError(f"image array must be uint8 or float in [0, 1], got dtype {array.dtype}")


def read_image(image: PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """Return an image as uint8 ``(H, W, 3)`` RGB.

    Accepts a path (EXIF orientation applied; first frame of an animation), a PIL image, or a numpy array
    (H, W, 3) uint8 or float in [0, 1] ((H, W) and (H, W, 4) too). Alpha is dropped, grey is expanded,
    like ``PIL.Image.convert("RGB")``.
    """
    if isinstance(image, np.ndarray):
        return _image_array_to_uint8(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"expected a path, PIL image or numpy array, got {type(image).__name__}")
    path = Path(image)
    _check_readable(path, "image")
    try:
        with Image.open(path) as pil:
            pil.load()
            pil = ImageOps.exif_transpose(pil)
            return np.asarray(pil.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from e
