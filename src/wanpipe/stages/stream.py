"""The decode stage, streaming: denoised latents -> uint8 frames handed to one sink per batch row,
chunk by chunk as the VAE decodes them, so the video is never held whole (see :mod:`wanpipe.video_writer`).

Each temporal decode chunk (the first latent frame alone, then ``chunk_frames`` latent frames: 1 then
4 * chunk_frames video frames) is converted to uint8 on the device (the same rounding as
:meth:`wanpipe.media.Video.to_uint8` applies to :func:`~wanpipe.stages.decode.decode`'s float32 frames,
so a streamed file equals one saved from the whole array) and written to the rows' sinks. Tiled when the
VAE budget says so: chunk by chunk (:func:`~wanpipe.models.vae_tiling.iter_decode_tiled`, every tile
its own causal cache, all alive), or, when the uint8 video is smaller than all the tiles' caches (a
short video: the caches of tiles with their halos can outweigh it several times), tile by tile into a
uint8 video (one tile's caches alive) that is then written in chunks. A parallel decode by bands (``halo``) and multi-segment videos (Animate) decode whole and are
then written chunk by chunk (:func:`write_frames`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from wanpipe.models.vae import WanVAE
from wanpipe.models.vae_tiling import (
    Tile,
    decode_heads,
    decoder_halo,
    iter_decode_tiled,
    iter_tile_pixels,
    split_tiles,
    upper_cache_bytes,
)
from wanpipe.stages.decode import decode, plan_decode
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
    plan = plan_decode(vae, z, memory)
    with placement.on_device(vae), plan.applied(vae):
        tile = plan.tile
        if tile is not None:
            tiles = split_tiles(z.shape[3], z.shape[4], tile, decoder_halo(vae.decoder))
            s = vae.config.spatial_stride
            held = z.shape[0] * limit * s * z.shape[3] * s * z.shape[4] * 3  # the uint8 video
            if held < upper_cache_bytes(vae.decoder, tiles, z.element_size()):
                return _decode_tile_major(vae, z, tiles, sinks, chunk_frames, limit)
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


def _decode_tile_major(
    vae: WanVAE, z: Tensor, tiles: list[Tile], sinks: Sequence[FrameSink], chunk_frames: int, limit: int
) -> int:
    """Tiled, tile by tile (one tile's causal caches alive, not every tile's) into a uint8 video, then
    written in chunks: for a short video, whose uint8 frames take less than all the tiles' caches."""
    s = vae.config.spatial_stride
    b, _, _, h, w = z.shape
    video = torch.empty(b, limit, s * h, s * w, 3, dtype=torch.uint8)
    heads = decode_heads(vae, z, chunk_frames)
    for t, start, pixels in iter_tile_pixels(vae, heads, tiles, chunk_frames):
        if start < limit:
            (r0, r1), (c0, c1) = t.rows, t.cols
            part = pixels_to_uint8(pixels[:, :, : limit - start])
            video[:, start : start + part.shape[1], s * r0 : s * r1, s * c0 : s * c1] = part
        del pixels
    del heads
    for start in range(0, limit, WRITE_CHUNK):
        _write(sinks, video[:, start : start + WRITE_CHUNK], opened=start > 0)
    return limit


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
