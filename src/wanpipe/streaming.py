"""Generate straight into a file: the frames stream from the decoder into the video encoder.

:func:`generate_to_file` is what ``wanpipe generate`` runs: :meth:`WanPipeline.run_contexts` with a
:class:`~wanpipe.video_writer.VideoWriter` as the row's sink, so the video is written chunk by chunk
as the VAE decodes it (uint8 per chunk; never the whole video as float32) and the file appears whole
or not at all. The Python API's :meth:`WanPipeline.generate` still returns the frames.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wanpipe.context import WanRequest
from wanpipe.media import PathLike, video_writer

if TYPE_CHECKING:
    from collections.abc import Callable

    from wanpipe.pipeline import WanPipeline
    from wanpipe.stages.preview import PreviewCallback

__all__ = ["Collect", "Discard", "WrittenVideo", "generate_to_file"]


@dataclass
class WrittenVideo:
    """What :func:`generate_to_file` wrote: the path (None when not written), the frames' count and
    size, fps, the seed drawn and the seconds per stage (``save_s``: finishing the file after the last
    frame was decoded into it)."""

    path: Path | None
    num_frames: int
    height: int
    width: int
    fps: float
    seed: int | None
    timings: dict[str, Any]
    decoder: str = "vae"  # what decoded the frames: "vae" or "tiny" (TAEHV)


class Discard:
    """A :class:`~wanpipe.video_writer.FrameSink` that counts the frames and drops them (the ranks of
    a parallel run that do not write)."""

    def __init__(self) -> None:
        self.frames = 0

    def open(self, height: int, width: int) -> None:
        pass

    def write(self, frames: np.ndarray) -> None:
        self.frames += frames.shape[0]

    def close(self) -> None:
        return None

    def abort(self) -> None:
        pass


def generate_to_file(
    pipe: WanPipeline,
    request: WanRequest,
    path: PathLike | None,
    *,
    format: str | None = None,
    progress: bool = True,
    callback: Callable[[int, int, float], None] | None = None,
    preview: PreviewCallback | None = None,
    **options: Any,
) -> WrittenVideo:
    """Generate ``request`` and write it to ``path`` as it is decoded (``path`` None: decode and drop
    the frames, for the ranks of a parallel run that do not write). ``format`` and ``options`` (crf,
    preset, quality, lossless, loop, overwrite) are :meth:`wanpipe.media.Video.save`'s; a request
    without a seed gets rank 0's under torch.distributed, as :meth:`WanPipeline.generate_batch`;
    ``preview(Preview)``: live previews (:meth:`WanPipeline.generate`'s)."""
    from wanpipe.parallel.mesh import shared_seed

    if request.seed is None:
        request = replace(request, seed=shared_seed(None))
    ctx = pipe.tokenizer.make_context(request)
    sink = Discard() if path is None else video_writer(path, ctx.fps, ctx.num_frames, format, **options)
    made, timings = pipe.run_contexts([ctx], callback, progress=progress, preview=preview, sinks=[sink])
    assert made[0] is sink
    t0 = time.perf_counter()
    written = sink.close()
    report = {**asdict(timings), "save_s": time.perf_counter() - t0}
    return WrittenVideo(
        written,
        ctx.num_frames,
        ctx.height,
        ctx.width,
        float(ctx.fps),
        ctx.seed,
        report,
        ctx.approximations.decoder,
    )


class Collect:
    """A :class:`~wanpipe.video_writer.FrameSink` that keeps the uint8 chunks (tests; a caller that
    wants the frames of a streamed run): ``frames()`` -> (F, H, W, 3) uint8."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.closed = self.aborted = False

    def open(self, height: int, width: int) -> None:
        self.size = (height, width)

    def write(self, frames: np.ndarray) -> None:
        self.chunks.append(frames.copy())

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True
        self.chunks = []

    def frames(self) -> np.ndarray:
        return np.concatenate(self.chunks)
