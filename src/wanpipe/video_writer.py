"""Streaming video files: frames go into the encoder chunk by chunk, the file appears whole or not at all.

A :class:`FrameSink` takes a video's frames in order, as uint8 chunks, and writes them somewhere::

    sink.open(height, width)       # once, before the first chunk
    sink.write(chunk)              # uint8 (f, H, W, 3), any number of times, f >= 1
    sink.close()                   # the video is complete: finish it (-> the path written)
    sink.abort()                   # or: something failed, leave nothing behind (safe at any time, twice)

:class:`VideoWriter` is the sink of a media file (the formats of :mod:`wanpipe.media`, which writes
:meth:`~wanpipe.media.Video.save` through it): mp4 frames are encoded as they come (PyAV), a PNG folder
gets one file per frame as they come, so neither holds the video; animated GIF / WebP hold the frames
as uint8 (Pillow writes an animation in one call, with the durations of all frames), a single image
keeps the first frame. The decode stage hands it the frames per temporal decode chunk
(:func:`wanpipe.stages.stream.decode_into`), so a file written by the CLI or the server never holds
the video as float32.

Atomic: a file is written to a hidden temporary file in the destination's directory and moved into
place with ``os.replace`` by :meth:`VideoWriter.close`; a PNG folder is written to a hidden temporary
sibling folder and renamed into place. :meth:`VideoWriter.abort` (or an error inside ``close``) removes
the temporary and leaves the destination as it was.

:class:`Tee` feeds several sinks (the server's video and its first-frame thumbnail);
:class:`DeferredErrors` keeps a sink's write error (a full disk) for its ``close()``, so the other videos
of a batch go on.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

PathLike = str | os.PathLike[str]

__all__ = ["DeferredErrors", "FrameSink", "Tee", "VideoWriter"]


@runtime_checkable
class FrameSink(Protocol):
    """Where a video's frames go, chunk by chunk (see the module docstring)."""

    def open(self, height: int, width: int) -> None:
        """Before the first chunk: the frames' size in pixels."""

    def write(self, frames: np.ndarray) -> None:
        """The next frames, uint8 (f, H, W, 3)."""

    def close(self) -> Path | None:
        """All frames were written: finish (-> the path written, if any)."""

    def abort(self) -> None:
        """Stop and leave nothing behind; safe before ``open`` and after ``close`` or ``abort``."""


class Tee:
    """One sink that writes every chunk to each of ``sinks`` (closes them in order, aborts them all)."""

    def __init__(self, *sinks: FrameSink) -> None:
        self.sinks = sinks

    def open(self, height: int, width: int) -> None:
        for sink in self.sinks:
            sink.open(height, width)

    def write(self, frames: np.ndarray) -> None:
        for sink in self.sinks:
            sink.write(frames)

    def close(self) -> Path | None:
        paths = []
        try:
            for sink in self.sinks:
                paths.append(sink.close())
        except BaseException:
            self.abort()
            raise
        return paths[0] if paths else None

    def abort(self) -> None:
        for sink in self.sinks:
            sink.abort()


class DeferredErrors:
    """A sink whose ``open`` / ``write`` errors (an Exception, e.g. a full disk) do not stop the caller: the
    sink aborts, drops the frames that follow, and its ``close()`` raises the error. A batch of several
    videos goes on when one file cannot be written; that video fails alone (the server's jobs)."""

    def __init__(self, sink: FrameSink) -> None:
        self.sink = sink
        self.error: Exception | None = None

    def _guard(self, call: Any, *args: Any) -> None:
        if self.error is not None:
            return
        try:
            call(*args)
        except Exception as e:
            self.error = e
            self.sink.abort()

    def open(self, height: int, width: int) -> None:
        self._guard(self.sink.open, height, width)

    def write(self, frames: np.ndarray) -> None:
        self._guard(self.sink.write, frames)

    def close(self) -> Path | None:
        if self.error is not None:
            raise self.error
        return self.sink.close()

    def abort(self) -> None:
        self.sink.abort()


# ---------------------------------------------------------------------------------------------------------
# Temporary destinations


def temp_sibling(dest: Path) -> Path:
    """A hidden, random name next to ``dest`` (for a temporary file or folder)."""
    return dest.parent / f".{dest.name}.{secrets.token_hex(6)}.tmp"


def create_temp_file(dest: Path) -> Path:
    """Create an empty temporary file next to ``dest`` (by us, O_EXCL, with the umask's permissions,
    unlike tempfile's 0600) and return its path."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temp_sibling(dest)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def commit_file(tmp: Path, dest: Path) -> None:
    """fsync ``tmp`` and move it onto ``dest`` (an existing file is replaced atomically)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def check_folder(dest: Path, overwrite: bool) -> None:
    """Refuse to write a PNG folder onto a file, or onto a non-empty folder unless ``overwrite``."""
    if dest.exists():
        if not dest.is_dir():
            raise FileExistsError(f"cannot write a PNG folder to {str(dest)!r}: a file with that name exists")
        if any(dest.iterdir()) and not overwrite:
            raise FileExistsError(
                f"folder {str(dest)!r} exists and is not empty; pass overwrite=True to replace it"
            )


def create_temp_folder(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temp_sibling(dest)
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def commit_folder(tmp: Path, dest: Path) -> None:
    """Move the folder ``tmp`` onto ``dest``; a non-empty ``dest`` (overwrite) is moved aside first and
    deleted after, or put back if the move fails."""
    if dest.is_dir() and any(dest.iterdir()):
        old = temp_sibling(dest)
        os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)  # an empty existing folder is replaced by rename(2)


# ---------------------------------------------------------------------------------------------------------
# Encoders: each writes to a temporary path it is given; the writer moves it into place


def _av() -> Any:
    """PyAV, imported on first use: it maps ~16 MB of FFmpeg libraries that only video files need."""
    import av

    return av


def frame_durations_ms(num_frames: int, fps: float, step_ms: int) -> list[int]:
    """Per-frame durations in multiples of ``step_ms``, rounded on the cumulative timeline (exact total)."""
    ends = [round((i + 1) * 1000.0 / fps / step_ms) * step_ms for i in range(num_frames)]
    durations = [b - a for a, b in zip([0, *ends[:-1]], ends)]
    return [max(d, step_ms) for d in durations]


class _Mp4:
    """H.264 yuv420p, frames encoded as they come; odd sizes padded by repeating the bottom / right edge."""

    def __init__(self, path: Path, fps: float, height: int, width: int, crf: int, preset: str) -> None:
        av = _av()
        if "libx264" not in av.codecs_available:
            raise RuntimeError("this PyAV build has no libx264 encoder; cannot write .mp4")
        self.size = height, width
        self.padded = height + height % 2, width + width % 2
        rate = Fraction(fps).limit_denominator(100_000)
        self.container = av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"})
        try:
            self.stream = self.container.add_stream(
                "libx264", rate=rate, options={"crf": str(crf), "preset": preset}
            )
            self.stream.width, self.stream.height = self.padded[1], self.padded[0]
            self.stream.pix_fmt = "yuv420p"
        except BaseException:
            self.container.close()
            raise
        self.count = 0

    def add(self, frame: np.ndarray) -> None:
        av = _av()
        if self.padded != self.size:
            pad = ((0, self.padded[0] - self.size[0]), (0, self.padded[1] - self.size[1]), (0, 0))
            frame = np.pad(frame, pad, mode="edge")
        av_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        av_frame.pts = self.count
        self.count += 1
        self.container.mux(self.stream.encode(av_frame))

    def finish(self) -> None:
        try:
            self.container.mux(self.stream.encode(None))
        finally:
            self.container.close()

    def discard(self) -> None:
        with contextlib.suppress(Exception):  # the file is deleted anyway
            self.container.close()


class _Animation:
    """Animated GIF / WebP: Pillow writes all frames in one call, so the frames are held (uint8)."""

    def __init__(self, path: Path, fmt: str, fps: float, quality: int, lossless: bool, loop: int) -> None:
        self.path, self.fmt, self.fps = path, fmt, fps
        self.options = dict(quality=quality, lossless=lossless, loop=loop)
        self.images: list[Image.Image] = []

    def add(self, frame: np.ndarray) -> None:
        self.images.append(Image.fromarray(frame))

    def finish(self) -> None:
        images, loop = self.images, self.options["loop"]
        if self.fmt == "gif":
            durations = frame_durations_ms(len(images), self.fps, 10)
            images[0].save(
                self.path,
                format="GIF",
                save_all=True,
                append_images=images[1:],
                duration=durations,
                loop=loop,
            )
        else:
            images[0].save(
                self.path,
                format="WEBP",
                save_all=True,
                append_images=images[1:],
                duration=frame_durations_ms(len(images), self.fps, 1),
                loop=loop,
                lossless=self.options["lossless"],
                quality=self.options["quality"],
            )
        self.images = []

    def discard(self) -> None:
        self.images = []


class _Image:
    """A single PNG / JPEG image: the first frame (later ones are ignored)."""

    def __init__(self, path: Path, fmt: str, quality: int) -> None:
        self.path, self.fmt, self.quality = path, fmt, quality
        self.first: np.ndarray | None = None

    def add(self, frame: np.ndarray) -> None:
        if self.first is None:
            self.first = frame.copy()

    def finish(self) -> None:
        assert self.first is not None
        image = Image.fromarray(self.first)
        if self.fmt == "jpg":
            image.save(self.path, format="JPEG", quality=self.quality)
        else:
            image.save(self.path, format="PNG")

    def discard(self) -> None:
        self.first = None


class _PngFolder:
    """One PNG file per frame, ``frame_00000.png`` on, written as the frames come."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def add(self, frame: np.ndarray) -> None:
        Image.fromarray(frame).save(self.folder / f"frame_{self.count:05d}.png", format="PNG")
        self.count += 1

    def finish(self) -> None:
        pass

    def discard(self) -> None:
        pass


class VideoWriter:
    """A :class:`FrameSink` that writes a media file (or a folder of PNGs), atomically.

    ``fmt``: one of :data:`wanpipe.media.OUTPUT_FORMATS` (resolve it from a path with
    :func:`wanpipe.media.output_format_for`, or use :func:`wanpipe.media.video_writer`). The options are
    :meth:`wanpipe.media.Video.save`'s: ``crf`` / ``preset`` (mp4), ``quality`` (lossy WebP, JPEG),
    ``lossless`` (WebP), ``loop`` (GIF / WebP), ``overwrite`` (a non-empty PNG folder).
    """

    def __init__(
        self,
        path: PathLike,
        fps: float,
        fmt: str,
        *,
        crf: int = 18,
        preset: str = "medium",
        quality: int = 95,
        lossless: bool = False,
        loop: int = 0,
        overwrite: bool = False,
    ) -> None:
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        if not 0 <= quality <= 100:
            raise ValueError(f"quality must be in [0, 100], got {quality}")
        if loop < 0:
            raise ValueError(f"loop must be >= 0, got {loop}")
        self.path = Path(path)
        self.fps = float(fps)
        self.fmt = fmt
        self.options = dict(crf=crf, preset=preset, quality=quality, lossless=lossless, loop=loop)
        self.overwrite = overwrite
        self.frames = 0  # written so far
        self._tmp: Path | None = None
        self._encoder: _Mp4 | _Animation | _Image | _PngFolder | None = None
        self._size: tuple[int, int] | None = None

    def open(self, height: int, width: int) -> None:
        if self._tmp is not None:
            raise RuntimeError(f"{self.path} is already open")
        path, o = self.path, self.options
        if self.fmt == "png-folder":
            check_folder(path, self.overwrite)
            self._tmp = create_temp_folder(path)
        else:
            if path.is_dir():
                raise IsADirectoryError(f"cannot write a {self.fmt} file to {str(path)!r}: it is a directory")
            self._tmp = create_temp_file(path)
        tmp = self._tmp
        try:
            if self.fmt == "mp4":
                self._encoder = _Mp4(tmp, self.fps, height, width, o["crf"], o["preset"])
            elif self.fmt in ("webp", "gif"):
                self._encoder = _Animation(tmp, self.fmt, self.fps, o["quality"], o["lossless"], o["loop"])
            elif self.fmt == "png-folder":
                self._encoder = _PngFolder(tmp)
            elif self.fmt in ("png", "jpg"):
                self._encoder = _Image(tmp, self.fmt, o["quality"])
            else:
                raise ValueError(f"unknown output format {self.fmt!r}")
        except BaseException:
            self.abort()
            raise
        self._size = (height, width)

    def write(self, frames: np.ndarray) -> None:
        if self._encoder is None or self._size is None:
            raise RuntimeError(f"{self.path} is not open")
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (*self._size, 3):
            size = self._size
            self.abort()
            raise ValueError(
                f"expected uint8 frames (f, {size[0]}, {size[1]}, 3), got {frames.dtype} {tuple(frames.shape)}"
            )
        try:
            for frame in frames:
                self._encoder.add(np.ascontiguousarray(frame))
                self.frames += 1
        except BaseException:
            self.abort()
            raise

    def close(self) -> Path:
        encoder, tmp = self._encoder, self._tmp
        if encoder is None or tmp is None:
            raise RuntimeError(f"{self.path} is not open")
        if self.frames < 1:
            self.abort()
            raise ValueError("need at least one frame, got 0")
        try:
            encoder.finish()
            if self.fmt == "png-folder":
                commit_folder(tmp, self.path)
            else:
                commit_file(tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._encoder = self._tmp = None
        return self.path

    def abort(self) -> None:
        encoder, tmp = self._encoder, self._tmp
        self._encoder = self._tmp = None
        if encoder is not None:
            encoder.discard()
        if tmp is not None:
            if self.fmt == "png-folder":
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
