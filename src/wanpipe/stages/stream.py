"""The decode stage, streaming: denoised latents -> uint8 frames handed to one sink per batch row,
chunk by chunk as the VAE decodes them, so the video is never held whole (see :mod:`wanpipe.video_writer`).

Each temporal decode chunk (the first latent frame alone, then ``chunk_frames`` latent frames: 1 then
4 * chunk_frames video frames) is converted to uint8 on the device (the same rounding as
:meth:`wanpipe.media.Video.to_uint8` applies to :func:`~wanpipe.stages.decode.decode`'s float32 frames,
so a streamed file equals one saved from the whole array) and written to the rows' sinks. Tiled when the
VAE budget says so (:func:`~wanpipe.models.vae_tiling.iter_decode_tiled`, every tile its own causal
cache). A parallel decode by bands (``halo``) and multi-segment videos (Animate) decode whole and are
then written chunk by chunk (:func:`write_frames`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from wanpipe.models.vae import WanVAE
from wanpipe.models.vae_tiling import iter_decode_tiled
from wanpipe.stages.decode import decode, vae_tile
from wanpipe.stages.placement import Placement
from wanpipe.video_writer import FrameSink

WRITE_CHUNK = 8
"""Frames converted to uint8 and written at a time by :func:`write_frames`."""


def pixels_to_uint8(video: Tensor) -> Tensor:
    """Decoder output (B, 3, T, H, W) in [-1, 1] -> frames (B, T, H, W, 3) uint8 on the CPU:
    ``round(clamp(x / 2 + 0.5, 0, 1) * 255)`` in float32 (half to even, as numpy)."""
    x = video.float() / 2 + 0.5 if video.dtype != torch.float32 else video / 2 + 0.5
    return float_to_uint8(x.clamp_(0, 1).permute(0, 2, 3, 4, 1))


def float_to_uint8(frames: Tensor) -> Tensor:
    """Frames (..., 3) float in [0, 1] -> uint8 on the CPU, as :meth:`wanpipe.media.Video.to_uint8`."""
    return (frames.float().clamp(0, 1) * 255).round_().to(torch.uint8).cpu()


def _write(sinks: Sequence[FrameSink], frames: Tensor, opened: bool) -> None:
    """uint8 frames (B, t, H, W, 3) on the CPU -> row b to ``sinks[b]`` (opened first unless ``opened``)."""
    if not opened:
        for sink in sinks:
            sink.open(frames.shape[2], frames.shape[3])
    for row, sink in enumerate(sinks):
        sink.write(frames[row].numpy())


def write_frames(frames: Tensor, sinks: Sequence[FrameSink], chunk: int = WRITE_CHUNK) -> None:
    """Whole frames (B, F, H, W, 3) float in [0, 1] -> each row into its sink (opened here), ``chunk``
    frames converted at a time."""
    for start in range(0, frames.shape[1], chunk):
        _write(sinks, float_to_uint8(frames[:, start : start + chunk]), opened=start > 0)


def decode_into(
    vae: WanVAE,
    latents: Tensor,
    placement: Placement,
    sinks: Sequence[FrameSink],
    *,
    vae_dtype: torch.dtype,
    chunk_frames: int = 1,
    halo: int | None = None,
    memory: int | None = None,
    num_frames: int | None = None,
) -> int:
    """Denoised latents (B, z, f, h, w) -> row b's frames written to ``sinks[b]`` (opened here, not
    closed) chunk by chunk; at most ``num_frames`` frames per row. -> the frames written per row.

    The arguments are :func:`~wanpipe.stages.decode.decode`'s; the frames are the ones it returns."""
    if len(sinks) != latents.shape[0]:
        raise ValueError(f"need one sink per row: {latents.shape[0]} rows, {len(sinks)} sinks")
    limit = num_frames if num_frames is not None else vae.config.temporal_stride * (latents.shape[2] - 1) + 1
    if halo is not None and placement.rank0_encodes:  # the bands are gathered whole: write them after
        frames = decode(
            vae, latents, placement, vae_dtype=vae_dtype, chunk_frames=chunk_frames, halo=halo, memory=memory
        )
        write_frames(frames[:, :limit], sinks)
        return min(limit, frames.shape[1])
    z = vae.denormalize_latents(latents.to(placement.device, vae_dtype))
    written = 0
    with placement.on_device(vae):
        tile = vae_tile(vae, z, memory)
        chunks = (
            vae.iter_decode(z, chunk_frames)
            if tile is None
            else iter_decode_tiled(vae, z, tile, chunk_frames)
        )
        for chunk in chunks:
            if written >= limit:
                break
            pixels = pixels_to_uint8(chunk[:, :, : limit - written])
            del chunk
            _write(sinks, pixels, opened=written > 0)
            written += pixels.shape[1]
    return written


@contextmanager
def aborted_on_error(sinks: Sequence[FrameSink] | None) -> Iterator[None]:
    """Abort every sink (nothing left behind) when the block raises, then re-raise."""
    try:
        yield
    except BaseException:
        for sink in sinks or ():
            sink.abort()
        raise


__all__ = ["aborted_on_error", "decode_into", "float_to_uint8", "pixels_to_uint8", "write_frames"]
