"""Live previews while denoising: each step's estimate of the clean latents, decoded small.

At step i the sampler holds x_t and the DiT's guided velocity v; flow matching's estimate of the clean
latents is x0 = x_t - sigma_i * v, put through the mode's ``Conditioning.finish`` (TI2V's clean first
frame put back, VACE's reference frames and Animate's character frame dropped), as the final latents are.
Every ``preview_every`` steps of a row (and at its last step) its x0 is decoded by a
:class:`PreviewDecoder` into small frames and handed to the caller as a
:class:`~wanpipe.context.Preview` message, one per row:

- :class:`LinearPreviewDecoder` (default, no weights): the published latent-to-RGB factors
  (:mod:`wanpipe.models.latent_rgb`), one frame per latent frame, then enlarged (nearest) so the
  longest side is :data:`PREVIEW_SIZE` (never beyond the video's own size);
- the tiny VAE (TAEHV), when the pipeline has one loaded: every frame, shrunk (nearest) the same way.

Nothing here writes into the loop's tensors: x0 is a new tensor, so the final frames are bit-identical
with previews on or off. Where it runs: on a CUDA device x0 is decoded on the device in the loop's
stream, the small uint8 frames are copied to pinned host memory without blocking, and a side thread
waits for that copy and calls the callback, so the loop does not wait (when the callback falls two
previews behind, a new one is dropped, never the last step's). On the CPU the decode and the callback
run inline (bench/bench_preview.py: the linear preview costs ~1% of a step there).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from wanpipe.context import DEFAULT_PREVIEW_EVERY, Preview, WanContext
from wanpipe.models.latent_rgb import LatentToRGB

PREVIEW_SIZE = 256
"""The previews' longest side in pixels (smaller when the video itself is)."""

PreviewCallback = Callable[[Preview], None]


class PreviewDecoder(Protocol):
    """Decodes x0 into small frames. ``name`` goes into each :class:`~wanpipe.context.Preview`."""

    name: str

    def __call__(self, latents: Tensor, size: tuple[int, int]) -> Tensor:
        """Normalised latents (B, C, f, h, w) -> frames (B, F, H', W', 3) uint8 on the latents' device,
        H' x W' = ``size``."""
        ...


def preview_size(height: int, width: int, longest: int = PREVIEW_SIZE) -> tuple[int, int]:
    """The preview's (height, width) for a video of ``height`` x ``width``: longest side ``longest``
    (or the video's own when smaller), the aspect ratio kept (rounded, at least 1 pixel)."""
    scale = min(1.0, longest / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_nearest(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """Frames (..., h, w, 3) -> (..., H, W, 3), nearest neighbour: pixel (y, x) is source pixel
    (floor(y * h / H), floor(x * w / W)) (PyTorch's "nearest"), any dtype."""
    h, w = frames.shape[-3:-1]
    height, width = size
    if (h, w) == (height, width):
        return frames
    rows = (torch.arange(height, device=frames.device) * h) // height
    cols = (torch.arange(width, device=frames.device) * w) // width
    return frames.index_select(-3, rows).index_select(-2, cols)


class LinearPreviewDecoder:
    """The latent-to-RGB factors (ComfyUI's Wan 2.1 / 2.2 ones), one frame per latent frame."""

    name = "linear"

    def __init__(self, channels: int) -> None:
        self.project = LatentToRGB(channels)

    def __call__(self, latents: Tensor, size: tuple[int, int]) -> Tensor:
        self.project.to(latents.device)
        return resize_nearest(self.project(latents), size)


class TinyPreviewDecoder:
    """The tiny VAE (TAEHV: ``decode_video``, normalised latents -> frames in [0, 1]): every video frame,
    shrunk to the preview size by area averaging, rounded to 8 bits."""

    name = "tiny"

    def __init__(self, taehv: torch.nn.Module) -> None:
        self.taehv = taehv

    def __call__(self, latents: Tensor, size: tuple[int, int]) -> Tensor:
        weight = next(self.taehv.parameters())
        video = self.taehv.decode_video(latents.to(weight.device, weight.dtype))  # (B, 3, F, H, W)
        b, _, f, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * f, 3, h, w).float()
        if (h, w) != size:
            frames = torch.nn.functional.interpolate(frames, size=size, mode="area")
        frames = frames.clamp(0, 1).mul(255).round().to(torch.uint8)
        return frames.view(b, f, 3, *size).permute(0, 1, 3, 4, 2).contiguous().to(latents.device)


def preview_decoder(
    choice: str, channels: int, taehv: torch.nn.Module | None, device: torch.device
) -> PreviewDecoder:
    """The decoder for ``choice`` ("linear", "tiny", or "auto": the tiny VAE when one is loaded and the
    device is a GPU, where it costs little next to a step; else the linear one)."""
    if choice == "tiny" and taehv is None:
        raise ValueError("preview_decoder 'tiny' needs the tiny VAE loaded (--tiny-vae / load_tiny_vae)")
    if taehv is not None and (choice == "tiny" or (choice == "auto" and device.type == "cuda")):
        return TinyPreviewDecoder(taehv)
    return LinearPreviewDecoder(channels)


@dataclass
class PreviewPlan:
    """What the caller asked for: ``callback`` gets the previews; per row of the batch, ``every`` (steps
    between previews) and ``fps`` (the video's frame rate)."""

    callback: PreviewCallback
    every: list[int]
    fps: list[float]
    sizes: list[tuple[int, int]]  # each row's preview (height, width)

    @classmethod
    def of(cls, callback: PreviewCallback, contexts: Sequence[WanContext]) -> PreviewPlan:
        """The plan for a batch of contexts (their ``preview_every``, fps and size)."""
        return cls(
            callback,
            [c.preview_every or DEFAULT_PREVIEW_EVERY for c in contexts],
            [float(c.fps) for c in contexts],
            [preview_size(c.height, c.width) for c in contexts],
        )


class PreviewSink:
    """Turns the loop's x0 into :class:`~wanpipe.context.Preview` messages for one batch.

    ``decoder``: the :class:`PreviewDecoder`; ``temporal_stride``: video frames per latent frame (the
    preview's fps from it); ``threaded``: the callback on a side thread (None: on a CUDA device). Use as
    a context manager: leaving it waits for the previews in flight and raises the callback's error, if
    any (unless an error is already on its way)."""

    def __init__(
        self,
        plan: PreviewPlan,
        decoder: PreviewDecoder,
        temporal_stride: int,
        device: torch.device,
        threaded: bool | None = None,
    ):
        self.plan, self.decoder, self.stride = plan, decoder, temporal_stride
        self.dropped = 0  # previews skipped because the callback had fallen behind (threaded)
        self._cuda = device.type == "cuda"
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if self._cuda if threaded is None else threaded:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._worker, name="wanpipe-preview", daemon=True)
            self._thread.start()

    def segment(self, offset: int, total: int, rows: Sequence[int]) -> StepPreview:
        """The loop's view for one denoising run: its steps are ``offset + i`` of ``total``, its batch
        positions are the input rows ``rows``."""
        return StepPreview(self, offset, total, list(rows))

    def due(self, row: int, step: int, total: int) -> bool:
        return step == total - 1 or (step + 1) % self.plan.every[row] == 0

    def submit(self, rows: list[int], step: int, total: int, x0: Tensor) -> None:
        """x0 (len(rows), C, f, h, w) of the input ``rows`` after ``step`` of ``total``: decode and send."""
        self._raise()
        if self._queue is not None and self._queue.qsize() >= 2 and step != total - 1:
            self.dropped += 1
            return
        size = self.plan.sizes[rows[0]]  # the rows of a batch share their size
        frames = self.decoder(x0, size)
        represented = self.stride * (x0.shape[2] - 1) + 1  # the video frames x0 stands for
        item = (rows, step, total, frames.shape[1] / represented)
        if self._queue is None:
            self._deliver(*item, frames.cpu().numpy())
            return
        host = frames.to("cpu", non_blocking=self._cuda)  # pinned memory, the copy queued in the stream
        done = None
        if self._cuda:
            done = torch.cuda.Event()
            done.record()
        self._queue.put((item, host, done, frames))

    def _deliver(self, rows: list[int], step: int, total: int, ratio: float, frames) -> None:
        for k, row in enumerate(rows):
            fps = self.plan.fps[row] * ratio
            message = Preview(row, step, total, frames[k], fps, self.decoder.name)
            self.plan.callback(message)

    def _worker(self) -> None:
        assert self._queue is not None
        while (work := self._queue.get()) is not None:
            item, host, done, _ = work
            try:
                if done is not None:
                    done.synchronize()
                if self._error is None:
                    self._deliver(*item, host.numpy())
            except BaseException as e:  # handed to the loop's thread at its next preview or at the end
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the previews in flight; raise the callback's error (``raise_errors``)."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if raise_errors:
            self._raise()

    def __enter__(self) -> PreviewSink:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(raise_errors=kind is None)


@dataclass
class StepPreview:
    """What the denoising loop calls after each step's prediction (:func:`~wanpipe.stages.denoise.denoise`)."""

    sink: PreviewSink
    offset: int
    total: int
    rows: list[int]  # batch position at the start of this run -> input row

    def __call__(
        self,
        i: int,
        positions: Sequence[int],
        latents: Tensor,
        noise_pred: Tensor,
        sigma: float,
        finish: Callable[[Tensor], Tensor],
    ) -> None:
        """Step ``i``: ``latents`` x_t (B, C, f, h, w) and ``noise_pred`` v of the batch positions
        ``positions`` (rows cancelled mid-run are gone); ``finish``: the mode's fix-up of the result."""
        step = self.offset + i
        rows = [self.rows[p] for p in positions]
        want = [k for k, row in enumerate(rows) if self.sink.due(row, step, self.total)]
        if not want:
            return
        x0 = finish(latents - sigma * noise_pred)
        self.sink.submit([rows[k] for k in want], step, self.total, x0[want])
