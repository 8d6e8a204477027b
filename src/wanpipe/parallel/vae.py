"""The VAE decode split across the ranks by horizontal bands of latent rows (``--vae-parallel``).

Exact (:func:`exact_parallel_decode`, the default of ``--vae-parallel``): rank 0 runs the decoder's
low-resolution head (conv in, the mid block with its whole-frame attention) once over the whole latent
and broadcasts it; rank r then runs the upsampling levels on its band of latent rows plus the halo of
:func:`wanpipe.models.vae_tiling.decoder_halo` (their receptive field), crops it, and the bands are
all-gathered: the frames of one process, up to float rounding.

Approximate (:func:`parallel_decode`, ``--vae-halo ROWS`` given): rank r of N decodes the latent rows ``[a_r, b_r)`` (N nearly equal bands, top to bottom) plus
``halo`` latent rows on each side (cut at the picture's edges), keeps the pixel rows of its own band
and the bands are all-gathered over the default group: every rank ends with the whole video.

An approximation at the band edges: the decoder's convolutions see only ``halo`` rows of the
neighbouring bands (their receptive field is wider) and its mid-block attention, global over each
frame's pixels, sees only the rank's band plus halo. See docs/parallel.md for the measured error.
The causal temporal chunks are unchanged (every rank runs all of them on its band).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from wanpipe.models.vae import WanVAE
from wanpipe.models.vae_tiling import decode_heads, decode_tiles, decoder_halo, split_tiles

EXACT_HALO = -1
"""The executor's ``vae_halo`` for the exact parallel decode (``--vae-parallel`` without ``--vae-halo``)."""


def band_bounds(rows: int, world: int) -> list[tuple[int, int]]:
    """``world`` contiguous bands of ``rows`` latent rows, sizes differing by at most one."""
    base, extra = divmod(rows, world)
    bounds, start = [], 0
    for r in range(world):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def decode_band(
    vae: WanVAE,
    z: torch.Tensor,
    rank: int,
    world: int,
    halo: int,
    chunk_frames: int = 1,
    after_chunk: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Rank ``rank``'s pixel band of raw latents (B, z, f, h, w): (B, 3, F, s (b - a), s w)."""
    h = z.shape[3]
    a, b = band_bounds(h, world)[rank]
    lo, hi = max(0, a - halo), min(h, b + halo)
    pixels = vae.decode(z[:, :, :, lo:hi], chunk_frames=chunk_frames, after_chunk=after_chunk)
    stride = pixels.shape[3] // (hi - lo)
    return pixels[:, :, :, stride * (a - lo) : stride * (b - lo)]


def parallel_decode(
    vae: WanVAE,
    z: torch.Tensor,
    halo: int,
    chunk_frames: int = 1,
    after_chunk: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Raw latents (B, z, f, h, w), the same on every rank -> the whole video (B, 3, F, s h, s w) on
    every rank, each rank decoding one band (a collective over the default group). With fewer latent
    rows than ranks every rank decodes the whole video."""
    if halo < 0:
        raise ValueError(f"the VAE halo must be >= 0 latent rows, got {halo}")
    world, rank = dist.get_world_size(), dist.get_rank()
    h = z.shape[3]
    if world == 1 or h < world:
        return vae.decode(z, chunk_frames=chunk_frames, after_chunk=after_chunk)
    bounds = band_bounds(h, world)
    band = decode_band(vae, z, rank, world, halo, chunk_frames, after_chunk)
    stride = band.shape[3] // (bounds[rank][1] - bounds[rank][0])
    tallest = max(b - a for a, b in bounds) * stride
    if band.shape[3] < tallest:  # all_gather needs equal shapes: pad to the tallest band
        pad = band.new_zeros(*band.shape[:3], tallest - band.shape[3], band.shape[4])
        band = torch.cat([band, pad], dim=3)
    gathered = [torch.empty_like(band) for _ in range(world)]
    dist.all_gather(gathered, band.contiguous())
    del band
    return torch.cat([g[:, :, :, : (b - a) * stride] for g, (a, b) in zip(gathered, bounds)], dim=3)


def _gather_bands(band: torch.Tensor, bounds: list[tuple[int, int]], stride: int) -> torch.Tensor:
    """All-gather each rank's pixel band (B, C, F, stride * rows_r, W) -> (B, C, F, stride * h, W)."""
    tallest = max(b - a for a, b in bounds) * stride
    if band.shape[3] < tallest:  # all_gather needs equal shapes: pad to the tallest band
        pad = band.new_zeros(*band.shape[:3], tallest - band.shape[3], band.shape[4])
        band = torch.cat([band, pad], dim=3)
    gathered = [torch.empty_like(band) for _ in range(len(bounds))]
    dist.all_gather(gathered, band.contiguous())
    del band
    return torch.cat([g[:, :, :, : (b - a) * stride] for g, (a, b) in zip(gathered, bounds)], dim=3)


def exact_parallel_decode(
    vae: WanVAE,
    z: torch.Tensor,
    chunk_frames: int = 1,
    tile_cols: int | None = None,
    after_chunk: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Raw latents (B, z, f, h, w) -> the whole video (B, 3, F, s h, s w) on every rank, equal to one
    process's decode up to float rounding (a collective over the default group).

    The head runs once, on rank 0, and is broadcast; each rank decodes its band of latent rows
    (:func:`band_bounds`) with the exact halo, in tiles of ``tile_cols`` latent columns (None: the
    band's whole width), and the bands are all-gathered. Only ``z``'s shape is read on ranks > 0."""
    world, rank = dist.get_world_size(), dist.get_rank()
    h, w = z.shape[3], z.shape[4]
    if world == 1:
        heads = decode_heads(vae, z, chunk_frames)
        tiles = split_tiles(h, w, (h, tile_cols or w), decoder_halo(vae.decoder))
        return decode_tiles(vae, heads, tiles, (0, h), after_chunk, chunk_frames)
    if rank == 0:
        heads = decode_heads(vae, z, chunk_frames).contiguous()
        shape = torch.tensor(heads.shape, dtype=torch.int64, device=z.device)
    else:
        shape = torch.zeros(5, dtype=torch.int64, device=z.device)
    dist.broadcast(shape, src=0)
    if rank != 0:
        heads = z.new_empty(*shape.tolist())
    dist.broadcast(heads, src=0)
    bounds = band_bounds(h, world)
    band = bounds[rank]
    if band[1] > band[0]:
        tiles = split_tiles(h, w, (band[1] - band[0], tile_cols or w), decoder_halo(vae.decoder), band)
        pixels = decode_tiles(vae, heads, tiles, band, after_chunk, chunk_frames)
    else:  # fewer latent rows than ranks: an empty band
        stride = vae.config.spatial_stride
        frames = vae.config.temporal_stride * (z.shape[2] - 1) + 1
        pixels = z.new_zeros(z.shape[0], vae.config.video_out_channels, frames, 0, stride * w)
    del heads
    return _gather_bands(pixels, bounds, vae.config.spatial_stride)
