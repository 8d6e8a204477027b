"""Where ``wanpipe serve`` keeps a job's uploads and its finished video: a :class:`MediaStore`.

The job store (:mod:`wanpipe.serving.store`) keeps rows; the media store keeps files under keys:
``videos/<id>.mp4`` (the video), ``videos/<id>.jpg`` (its first frame), ``inputs/<id>.<name>.png`` (an
uploaded image) and ``inputs/<id>.<name>.npy`` (VACE's and Animate's videos as uint8 arrays). Two
backends:

* :class:`LocalMedia`: files in a folder, the same layout wherever it is: ``--output-dir`` (the default,
  beside the job database) or ``--media-dir DIR`` (a shared mount such as NFS, for several servers).
* :class:`wanpipe.serving.media_s3.S3Media`: objects in S3-compatible storage (``--media s3://bucket/prefix``,
  boto3; endpoint and credentials from the AWS environment variables).

Every write is atomic: a file is written to a temporary name in its own folder and renamed onto its key
(an object is uploaded in one request, or as a multipart upload completed only at the end), so a reader
never sees half a video. The content route streams a video from the store, or (``--media-redirect``,
object storage only) answers with a redirect to a presigned URL.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import numpy as np
    from starlette.responses import Response

    from wanpipe.video_writer import FrameSink

CHUNK_BYTES = 1 << 20  # streamed content: 1 MiB at a time


class MediaConfigError(RuntimeError):
    """The media store cannot be used as configured: a missing bucket, an unreachable endpoint, a bad URL,
    a folder this process cannot write. Its message is one line naming what is wrong."""


# ---------------------------------------------------------------------------------------------------------
# Keys


def video_key(job_id: str) -> str:
    return f"videos/{job_id}.mp4"


def thumbnail_key(job_id: str) -> str:
    return f"videos/{job_id}.jpg"


def input_key(job_id: str, name: str) -> str:
    """An uploaded image (PNG)."""
    return f"inputs/{job_id}.{name}.png"


def array_key(job_id: str, name: str) -> str:
    """An input kept as a uint8 array (``.npy``)."""
    return f"inputs/{job_id}.{name}.npy"


def key_job_id(key: str) -> str:
    """The job id a key belongs to (``videos/<id>.mp4`` -> ``<id>``)."""
    return key.rsplit("/", 1)[-1].split(".", 1)[0]


def is_temporary(key: str) -> bool:
    """A local backend's file being written (``.<name>.<hex>.tmp[suffix]``: a job id never starts with a dot)."""
    return key.rsplit("/", 1)[-1].startswith(".")


# ---------------------------------------------------------------------------------------------------------
# The interface


class MediaStore(ABC):
    """A job's files under keys (see the module docstring); safe to use from several threads.

    ``shared``: other servers use the same files (``--media-dir``, ``--media``): a starting server must not
    remove files its own job store does not know. ``redirect``: the content route answers with a redirect
    to :meth:`presigned_url` instead of streaming. ``where``: the place, for messages."""

    shared: bool = False
    redirect: bool = False
    where: str = ""

    @abstractmethod
    def check(self) -> None:
        """Raise :class:`MediaConfigError` when the store cannot be used (called once on start)."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (replacing what was there)."""

    @abstractmethod
    def writing(self, key: str, suffix: str = "") -> contextlib.AbstractContextManager[Path]:
        """A context manager yielding a local path (ending in ``suffix``) to write; when the block succeeds
        the file is stored under ``key`` atomically, when it raises nothing is stored."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes under ``key``; FileNotFoundError when there are none."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A binary stream of the bytes under ``key`` (the caller closes it); FileNotFoundError."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing happens when it is absent)."""

    @abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix`` (``"videos/"``, ``"inputs/<id>."``)."""

    def path(self, key: str) -> Path | None:
        """The local file of ``key`` (served with range requests), or None for object storage."""
        return None

    def presigned_url(self, key: str, *, filename: str, media_type: str) -> str:
        """A URL that serves ``key`` without credentials for a while (object storage only)."""
        raise NotImplementedError(f"{type(self).__name__} has no presigned URLs")


# ---------------------------------------------------------------------------------------------------------
# A local (or mounted) folder


def _temp_sibling(dest: Path, suffix: str = "") -> Path:
    return dest.parent / f".{dest.name}.{secrets.token_hex(6)}.tmp{suffix}"


class LocalMedia(MediaStore):
    """Files under ``root`` (``root/videos``, ``root/inputs``). A write goes to a temporary file in the
    key's own folder, is flushed to disk, then renamed onto the key: atomic on a local disk and on NFS."""

    def __init__(self, root: str | os.PathLike[str], *, shared: bool = False):
        self.root = Path(root)
        self.shared = shared
        self.where = str(self.root)
        for folder in (self.root / "videos", self.root / "inputs"):
            folder.mkdir(parents=True, exist_ok=True)

    def check(self) -> None:
        for folder in (self.root / "videos", self.root / "inputs"):
            if not os.access(folder, os.W_OK | os.X_OK):
                raise MediaConfigError(f"the media folder {folder} is not writable by this process")

    def _file(self, key: str) -> Path:
        folder, _, name = key.partition("/")
        if folder not in ("videos", "inputs") or not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a media key: {key!r}")
        return self.root / folder / name

    def path(self, key: str) -> Path:
        return self._file(key)

    @contextlib.contextmanager
    def writing(self, key: str, suffix: str = "") -> Iterator[Path]:
        dest = self._file(key)
        tmp = _temp_sibling(dest, suffix)
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put(self, key: str, data: bytes) -> None:
        with self.writing(key) as tmp, open(tmp, "wb") as f:
            f.write(data)

    def get(self, key: str) -> bytes:
        return self._file(key).read_bytes()

    def open(self, key: str) -> BinaryIO:
        return open(self._file(key), "rb")  # noqa: SIM115 - the caller's to close

    def exists(self, key: str) -> bool:
        return self._file(key).is_file()

    def delete(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)

    def keys(self, prefix: str) -> list[str]:
        folder, _, start = prefix.partition("/")
        if folder not in ("videos", "inputs"):
            raise ValueError(f"not a media prefix: {prefix!r}")
        try:
            names = os.listdir(self.root / folder)
        except FileNotFoundError:
            return []
        return sorted(f"{folder}/{n}" for n in names if n.startswith(start))


# ---------------------------------------------------------------------------------------------------------
# Writing and serving a job's files


def write_video(media: MediaStore, job_id: str, frames: np.ndarray, fps: float) -> None:
    """Store a job's video (mp4) and its first frame (JPEG); frames: float (F, H, W, 3) in [0, 1]. Each appears whole or
    not at all; when the thumbnail fails the video is removed too, and the error raised."""
    from wanpipe.media import Video

    video = Video(frames=frames, fps=fps)
    with media.writing(video_key(job_id), ".mp4") as tmp:
        video.save(tmp, format="mp4")
    try:
        with media.writing(thumbnail_key(job_id), ".jpg") as tmp:
            Video(frames=frames[:1], fps=fps).save(tmp, format="jpg")
    except BaseException:
        with contextlib.suppress(Exception):
            media.delete(video_key(job_id))
        raise


class VideoFiles:
    """A :class:`~wanpipe.video_writer.FrameSink` for a job's video (mp4) and its first-frame JPEG in a
    media store, written as the frames are decoded (into local temporary files the store gives,
    :meth:`MediaStore.writing`) and stored by ``close()`` (when either
    fails neither is kept, as :func:`write_video`). ``abort()`` stores neither."""

    def __init__(self, media: MediaStore, job_id: str, fps: float, num_frames: int) -> None:
        from wanpipe.media import video_writer

        self.media, self.job_id = media, job_id
        self._stack = contextlib.ExitStack()
        self._video = self._stack.enter_context(media.writing(video_key(job_id), ".mp4"))
        thumb = self._stack.enter_context(media.writing(thumbnail_key(job_id), ".jpg"))
        self.writers = (video_writer(self._video, fps, num_frames), video_writer(thumb, fps, 1, format="jpg"))

    def open(self, height: int, width: int) -> None:
        for writer in self.writers:
            writer.open(height, width)

    def write(self, frames: np.ndarray) -> None:
        for writer in self.writers:
            writer.write(frames)

    def close(self) -> Path:
        try:
            for writer in self.writers:
                writer.close()
        except BaseException as e:
            self.abort(e)
            raise
        try:
            self._stack.close()  # the thumbnail stored (entered last), then the video
        except BaseException:
            for key in (video_key(self.job_id), thumbnail_key(self.job_id)):  # neither without the other
                with contextlib.suppress(Exception):
                    self.media.delete(key)
            raise
        return self._video

    def abort(self, error: BaseException | None = None) -> None:
        for writer in self.writers:
            writer.abort()
        error = error or RuntimeError("aborted")
        with contextlib.suppress(BaseException):
            self._stack.__exit__(type(error), error, error.__traceback__)


def job_files(media: MediaStore, job_id: str, fps: float, num_frames: int) -> FrameSink:
    """The server's sink for a job's video and thumbnail (:class:`VideoFiles`); an error writing them
    (a full disk) is raised by ``close()``: the job fails alone, the batch goes on."""
    from wanpipe.video_writer import DeferredErrors

    return DeferredErrors(VideoFiles(media, job_id, fps, num_frames))


def write_input(media: MediaStore, key: str, array: np.ndarray) -> None:
    """Store an input: an image uint8 (H, W, 3) as PNG (``.png`` keys), any uint8 array as ``.npy``."""
    import numpy as np
    from PIL import Image

    buffer = BytesIO()
    if key.endswith(".npy"):
        np.save(buffer, array, allow_pickle=False)
    else:
        Image.fromarray(array).save(buffer, format="PNG")
    media.put(key, buffer.getvalue())


def read_input(media: MediaStore, key: str) -> np.ndarray:
    """An input as :func:`write_input` stored it: uint8 (H, W, 3) for an image, the array for ``.npy``."""
    import numpy as np

    data = media.get(key)
    if key.endswith(".npy"):
        return np.load(BytesIO(data), allow_pickle=False)
    from PIL import Image

    try:
        with Image.open(BytesIO(data), formats=("PNG",)) as image:
            return np.asarray(image.convert("RGB")).copy()
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"cannot read the stored input {key} ({e})") from None


def remove_job_media(media: MediaStore, job_id: str) -> None:
    """Remove a job's video, thumbnail and inputs."""
    keys = [video_key(job_id), thumbnail_key(job_id)]
    keys += [k for k in media.keys(f"inputs/{job_id}.") if key_job_id(k) == job_id]
    for key in keys:
        media.delete(key)


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    try:
        while chunk := stream.read(CHUNK_BYTES):
            yield chunk
    finally:
        stream.close()


async def media_response(media: MediaStore, key: str, media_type: str, filename: str) -> Response:
    """The HTTP answer serving ``key``: the local file (with range requests), a redirect to a presigned URL
    (``media.redirect``), or the object streamed from the store. FileNotFoundError when it is missing."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse, RedirectResponse, StreamingResponse

    path = media.path(key)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(key)
        return FileResponse(path, media_type=media_type, filename=filename, content_disposition_type="inline")
    if media.redirect:
        if not await run_in_threadpool(media.exists, key):
            raise FileNotFoundError(key)
        url = await run_in_threadpool(media.presigned_url, key, filename=filename, media_type=media_type)
        return RedirectResponse(url, status_code=307)
    stream = await run_in_threadpool(media.open, key)
    headers = {"Content-Disposition": f'inline; filename="{filename}"'}
    size = getattr(stream, "size", None)
    if size is not None:
        headers["Content-Length"] = str(size)
    return StreamingResponse(_chunks(stream), media_type=media_type, headers=headers)
