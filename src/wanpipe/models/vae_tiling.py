"""Exact tiled decoding for the Wan VAEs: memory that does not grow with the picture.

The decoder is a low-resolution head (``conv_in``, then the mid block, whose attention sees each
whole frame) followed by the upsampling levels and the output head, which are convolutions only.
The head runs on the whole latent; the upper part runs tile by tile, each tile cut out of the head's
output with a *halo* of extra latent pixels on every side that has a neighbour, and the halo is
cropped off the tile's pixels. The halo is the upper part's receptive field, computed from its
layers (:func:`decoder_halo`): a tile's cut edge is zero-padded by the first convolution where the
full picture has real pixels, and the wrong values spread by each convolution's reach (1 pixel for
a 3x3 kernel with padding 1) and double with each 2x upsampling. Pixels farther from the cut than
that are exactly the full decode's (up to summation order, ~1e-6 in fp32).

Time is handled by the causal cache, one per tile: every chunk of latent frames of one tile is run
through that tile's cache, so the temporal result is the untiled one too. :func:`decode_tiled` runs
tile by tile (all chunks of a tile, then the next tile: one tile's cache at a time, the lowest
memory); :func:`iter_decode_tiled` runs chunk by chunk (each tile of the chunk with its own cache),
for streaming the frames in order.

The tile size comes from a memory budget (:func:`plan_tiles`, from :func:`upper_bytes_per_pixel`,
an estimate from the layer list of the upper part's activations and caches per latent pixel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wanpipe.models.fastconv import Scratch
from wanpipe.models.vae import Decoder3d, Encoder3d, LatentDistribution, WanVAE
from wanpipe.models.vae_layers import (
    CausalCache,
    CausalConv3d,
    Resample,
    ResidualBlock,
    ResidualDownBlock,
    UpBlock,
    patchify,
    unpatchify,
)

# ----------------------------------------------------------------------------------------------
# The halo: the upper part's receptive field, from its layers
# ----------------------------------------------------------------------------------------------


def _conv_reach(conv: nn.Module) -> int:
    """How far (in pixels, along height or width) a wrong input pixel spreads through ``conv``: a
    stride-1 kernel k with padding p reads p pixels on one side and k - 1 - p on the other."""
    assert isinstance(conv, (nn.Conv2d, nn.Conv3d))
    if any(s != 1 for s in conv.stride[-2:]):
        raise ValueError(f"tiled decoding needs stride-1 convolutions, got {conv}")
    padding = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
    return max(max(p, k - 1 - p) for k, p in zip(conv.kernel_size[-2:], padding[-2:]))


def _spread(module: nn.Module, wrong: int) -> int:
    """``wrong`` pixels next to a tile's cut edge at ``module``'s input -> how many at its output."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        return wrong + _conv_reach(module)
    if isinstance(module, nn.Identity):
        return wrong
    if isinstance(module, ResidualBlock):
        main = _spread(module.conv2, _spread(module.conv1, wrong))
        return max(main, _spread(module.conv_shortcut, wrong))
    if isinstance(module, Resample) and module.mode.startswith("downsample"):
        # A 3x3 stride-2 kernel padded on the right/bottom only: output j reads inputs 2j .. 2j + 2, so
        # c wrong pixels at the left edge make ceil(c / 2) wrong, at the right edge floor(c / 2) + 1.
        return wrong // 2 + 1  # the time convolution after it is 1x1 in space
    if isinstance(module, ResidualDownBlock):
        out = wrong
        for resnet in module.resnets:
            out = _spread(resnet, out)
        if module.downsampler is not None:
            out = _spread(module.downsampler, out)
        return max(out, -(-wrong // module.shortcut.factor_s))  # block averages, aligned
    if isinstance(module, Resample):
        if module.mode == "upsample3d":
            wrong = _spread(module.time_conv, wrong)
        return _spread(module.conv, 2 * wrong)  # nearest 2x, then the 3x3 convolution
    if isinstance(module, UpBlock):
        out = wrong
        for resnet in module.resnets:
            out = _spread(resnet, out)
        if module.upsampler is not None:
            out = _spread(module.upsampler, out)
        if module.shortcut is not None:  # parameter-free, pixel-wise after the 2x spread
            out = max(out, wrong * module.shortcut.factor_s)
        return out
    raise TypeError(f"no receptive field rule for {type(module).__name__}")


def upper_scale(decoder: Decoder3d) -> int:
    """How many output pixels of :meth:`Decoder3d.upper` one latent pixel becomes along each side."""
    return 2 ** sum(block.upsampler is not None for block in decoder.up_blocks)


def upper_reach(decoder: Decoder3d) -> int:
    """Output pixels next to a tile's cut edge that differ from the full decode: the receptive field
    of the upsampling levels and the output head (norms and SiLUs are per pixel)."""
    wrong = 0
    for block in decoder.up_blocks:
        wrong = _spread(block, wrong)
    return _spread(decoder.conv_out, wrong)


def decoder_halo(decoder: Decoder3d) -> int:
    """Latent pixels a tile borrows from each neighbour so that its own pixels are exact:
    ``ceil(upper_reach / upper_scale)`` (13 for the Wan 2.1 VAE: 98 pixels / 8)."""
    return -(-upper_reach(decoder) // upper_scale(decoder))


def lower_scale(encoder: Encoder3d) -> int:
    """How many input pixels (after patchifying) of :meth:`Encoder3d.lower` make one latent pixel."""
    return 2 ** sum(
        isinstance(m, Resample) and m.mode.startswith("downsample") for m in encoder.down_blocks.modules()
    )


def encoder_halo(encoder: Encoder3d) -> int:
    """Latent pixels (each ``spatial_stride`` video pixels) a tile borrows from each neighbour so that
    the lower part's output on its own latent pixels is exact: the wrong latent pixels next to a cut,
    from the layers (the cut is on the latent grid, so the stride-2 grids of every level line up)."""
    wrong = _spread(encoder.conv_in, 0)
    for block in encoder.down_blocks:
        wrong = _spread(block, wrong)
    return wrong


# ----------------------------------------------------------------------------------------------
# Memory: an estimate per latent pixel, and the tiles a budget allows
# ----------------------------------------------------------------------------------------------


def upper_bytes_per_pixel(decoder: Decoder3d, itemsize: int, piece_frames: int = 4) -> int:
    """Bytes the upper part needs per latent pixel of its input (an estimate from the layer list).

    Per level at scale s (s^2 pixels per latent pixel): the causal caches, 2 frames of every
    3-frame temporal convolution's input, and the working set of the widest layer, about 5 tensors
    of ``piece_frames`` frames (input, normalised copy, convolution output, shortcut and the CPU
    convolution's transform buffers), plus an upsampler's output (twice the frames, 4x the pixels).
    Caches add up; working sets do not (one level runs at a time).
    """
    caches = 0
    work = 0
    scale = 1
    for block in decoder.up_blocks:
        widest, cached = _widest_and_caches(block)
        caches += cached * scale**2
        level = 5 * widest * piece_frames * scale**2
        if block.upsampler is not None:
            level += block.upsampler.conv.out_channels * 2 * piece_frames * (2 * scale) ** 2
            scale *= 2
        work = max(work, level)
    conv_out = decoder.conv_out
    caches += conv_out.time_pad * conv_out.in_channels * scale**2
    work = max(work, 3 * conv_out.in_channels * piece_frames * scale**2)
    return (caches + work) * itemsize


@dataclass(frozen=True)
class Tile:
    """One tile, in latent pixels: ``rows``/``cols`` its own pixels, ``region_rows``/``region_cols``
    what it decodes (its own plus the halo, cut at the picture's edges)."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    region_rows: tuple[int, int]
    region_cols: tuple[int, int]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles' edges fall, in latent pixels: ``rows`` the heights of the rows of tiles (top to
    bottom), ``cols`` the widths of the columns of tiles (left to right); they sum to the latent's height
    and width (or a band's height). What :func:`plan_tiles` returns: the edge tiles are wider than the
    inner ones by a halo, so that every tile's region (its pixels plus the halo) is about the same."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)


TileSpec = tuple[int, int] | TileGrid
"""A tiling: (rows, cols) latent pixels per tile (the last row and column of tiles may be smaller), or a
:class:`TileGrid`."""


def _sizes(length: int, tile: int | tuple[int, ...], side: str) -> tuple[int, ...]:
    if isinstance(tile, int):
        if tile < 1:
            raise ValueError(f"tiles must be at least 1x1 latent pixels, got {tile} {side}")
        return tuple(min(tile, length - a) for a in range(0, length, tile))
    if sum(tile) != length or min(tile, default=0) < 1:
        raise ValueError(f"tile {side} {tile} must be positive and add up to {length}")
    return tuple(tile)


def split_tiles(
    height: int, width: int, tile: TileSpec, halo: int, band: tuple[int, int] | None = None
) -> list[Tile]:
    """The tiles of a ``height`` x ``width`` latent, row-major, each with ``halo`` pixels borrowed per
    side (cut at the picture's edges): ``tile`` (rows, cols) latent pixels per tile or a
    :class:`TileGrid`; ``band`` = (first, end) row: only the tiles of those rows (a parallel rank's share)."""
    top, bottom = band if band is not None else (0, height)
    if isinstance(tile, TileGrid):
        row_sizes, col_sizes = _sizes(bottom - top, tile.rows, "rows"), _sizes(width, tile.cols, "cols")
    else:
        row_sizes, col_sizes = _sizes(bottom - top, tile[0], "rows"), _sizes(width, tile[1], "cols")
    tiles = []
    a = top
    for th in row_sizes:
        b = a + th
        c = 0
        for tw in col_sizes:
            d = c + tw
            region = ((max(0, a - halo), min(height, b + halo)), (max(0, c - halo), min(width, d + halo)))
            tiles.append(Tile((a, b), (c, d), *region))
            c = d
        a = b
    return tiles


def balanced_sizes(length: int, n: int, halo: int) -> tuple[int, ...] | None:
    """``n`` tile sizes along a side of ``length`` latent pixels whose regions (the tile plus ``halo`` per
    neighbour) are equal up to one pixel: edge tiles one halo wider than inner ones, as a region is
    ``ceil((length + 2 halo (n - 1)) / n)``, not a uniform split's ``ceil(length / n) + 2 halo``. None when
    the inner tiles would be empty (``n`` too many for the halo)."""
    if n == 1:
        return (length,)
    region = -(-(length + 2 * halo * (n - 1)) // n)
    sizes = [region - halo, *[region - 2 * halo] * (n - 2), region - halo]
    excess = sum(sizes) - length  # 0 <= excess < n: one pixel less for that many tiles, inner ones first
    for i in [*range(1, n - 1), 0, n - 1]:
        if excess and sizes[i] > 1:
            sizes[i] -= 1
            excess -= 1
    return tuple(sizes) if excess == 0 and min(sizes) >= 1 else None


def _regions(length: int, sizes: tuple[int, ...], halo: int) -> list[int]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [min(length, a + n + halo) - max(0, a - halo) for a, n in zip(starts, sizes)]


def plan_tiles(
    decoder: Decoder3d, height: int, width: int, budget: int, itemsize: int, piece_frames: int = 4
) -> TileGrid | None:
    """The :class:`TileGrid` (latent pixels) for a ``budget`` in bytes of the upper part's working
    memory, or None when the whole ``height`` x ``width`` latent fits (no tiling).

    The fewest tiles whose largest region (tile plus halo) fits, with :func:`balanced_sizes` along each
    side; ties go to the least decoded area. When not even the smallest tiles fit, inner tiles about
    ``halo`` wide (where the halo stops dominating the work). ``piece_frames``: as the decoder runs its upper levels (:meth:`Decoder3d.upper`).
    """
    per_pixel = upper_bytes_per_pixel(decoder, itemsize, piece_frames)
    return _plan(per_pixel, decoder_halo(decoder), height, width, budget)


def _widest_and_caches(block: nn.Module) -> tuple[int, int]:
    """A block's widest causal convolution (channels) and its causal caches' elements per pixel (the
    frames each temporal convolution keeps of its input)."""
    widest = cached = 0
    for m in block.modules():
        if isinstance(m, CausalConv3d):
            widest = max(widest, m.in_channels, m.out_channels)
            cached += m.time_pad * m.in_channels
    return widest, cached


def lower_bytes_per_pixel(encoder: Encoder3d, itemsize: int, piece_frames: int = 4) -> int:
    """Bytes the encoder's lower part (:meth:`Encoder3d.lower`) needs per latent pixel of its output,
    the estimate of :func:`upper_bytes_per_pixel` run downwards: per level at scale s (s^2 input pixels
    per latent pixel, s halving at each downsampler) the causal caches (add up) and about 5 tensors of
    the widest layer over ``piece_frames`` frames (the largest level counts)."""
    scale = lower_scale(encoder)
    conv_in = encoder.conv_in
    caches = conv_in.time_pad * conv_in.in_channels * scale**2
    work = 3 * conv_in.out_channels * piece_frames * scale**2
    for block in encoder.down_blocks:
        widest, cached = _widest_and_caches(block)
        caches += cached * scale**2
        work = max(work, 5 * widest * piece_frames * scale**2)
        downsamples = sum(
            isinstance(m, Resample) and m.mode.startswith("downsample") for m in block.modules()
        )
        scale //= 2**downsamples
    return (caches + work) * itemsize


def plan_encode_tiles(
    encoder: Encoder3d, height: int, width: int, budget: int, itemsize: int
) -> TileGrid | None:
    """:func:`plan_tiles` for :func:`encode_tiled`: the :class:`TileGrid` of a
    ``height`` x ``width`` latent whose lower-part working memory fits ``budget`` bytes (None: no
    tiling needed), the halo :func:`encoder_halo`."""
    return _plan(lower_bytes_per_pixel(encoder, itemsize), encoder_halo(encoder), height, width, budget)


def _plan(per_pixel: int, halo: int, height: int, width: int, budget: int) -> TileGrid | None:
    if per_pixel * height * width <= budget:
        return None
    sides = [_side_options(height, halo), _side_options(width, halo)]
    best: tuple[int, int, TileGrid] | None = None  # (tiles, decoded area, grid)
    for rows, row_region, row_area in sides[0]:
        for cols, col_region, col_area in sides[1]:
            if per_pixel * row_region * col_region > budget:
                continue
            key = (len(rows) * len(cols), row_area * col_area)
            if best is None or key < best[:2]:
                best = (*key, TileGrid(rows, cols))
            break  # more columns only cost more tiles
    if best is not None:
        return best[2]
    # Nothing fits: inner tiles about one halo wide, where the halo stops dominating the work.
    return TileGrid(*(_fallback(length, halo) for length in (height, width)))


def _side_options(length: int, halo: int) -> list[tuple[tuple[int, ...], int, int]]:
    """For 1, 2, ... tiles along a side: (the balanced sizes, the largest region, the regions' sum)."""
    options = []
    for n in range(1, length + 1):
        sizes = balanced_sizes(length, n, halo)
        if sizes is None:
            break
        regions = _regions(length, sizes, halo)
        options.append((sizes, max(regions), sum(regions)))
    return options


def _fallback(length: int, halo: int) -> tuple[int, ...]:
    n = max(1, -(-length // max(1, halo)))
    while (sizes := balanced_sizes(length, n, halo)) is None:
        n -= 1
    return sizes


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _chunks(frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """The latent frame ranges decoded together: the first frame alone, then ``chunk_frames`` at a time."""
    starts = [0, *range(1, frames, chunk_frames)]
    return [(s, 1 if s == 0 else min(frames, s + chunk_frames)) for s in starts]


def _check(vae: WanVAE, z: Tensor, chunk_frames: int) -> None:
    vae._check_latents(z)
    if z.shape[2] < 1:
        raise ValueError("latents have no frames")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")


def _finish(vae: WanVAE, x: Tensor) -> Tensor:
    x = unpatchify(x, vae.config.patch)
    return x.clamp(-1.0, 1.0) if vae.config.clip_output else x


def _crop(pixels: Tensor, tile: Tile, stride: int) -> Tensor:
    """A tile's own pixels out of its decoded region (B, C, T, stride * rows, stride * cols)."""
    (a, b), (c, d) = tile.rows, tile.cols
    lo_r, lo_c = tile.region_rows[0], tile.region_cols[0]
    return pixels[
        :, :, :, stride * (a - lo_r) : stride * (b - lo_r), stride * (c - lo_c) : stride * (d - lo_c)
    ]


def _region(x: Tensor, tile: Tile) -> Tensor:
    (a, b), (c, d) = tile.region_rows, tile.region_cols
    return x[:, :, :, a:b, c:d]


def decode_tiled(
    vae: WanVAE,
    z: Tensor,
    tile: TileSpec,
    chunk_frames: int = 1,
    after_chunk: Callable[[], None] | None = None,
) -> Tensor:
    """Raw latents (B, z_dim, f, h, w) -> video (B, 3, 4(f - 1) + 1, s h, s w), s = spatial_stride: the
    same frames as :meth:`WanVAE.decode`, decoded in the tiles of ``tile`` (a :data:`TileSpec`).

    The head runs on every chunk of the whole latent first (its outputs, at the latent resolution,
    are kept); then each tile runs all its chunks with its own causal cache, and its cropped pixels
    are written into the video. ``after_chunk()`` runs after each tile's chunk.
    """
    _check(vae, z, chunk_frames)
    heads = decode_heads(vae, z, chunk_frames)
    tiles = split_tiles(z.shape[3], z.shape[4], tile, decoder_halo(vae.decoder))
    return decode_tiles(vae, heads, tiles, (0, z.shape[3]), after_chunk, chunk_frames)


def decode_heads(vae: WanVAE, z: Tensor, chunk_frames: int = 1) -> Tensor:
    """The decoder's head over the whole of raw latents (B, z_dim, f, h, w), chunk by chunk (the first
    latent frame alone, then ``chunk_frames``): (B, C, f, h, w), what :func:`decode_tiles` takes."""
    cache = CausalCache()
    heads = []
    for s, e in _chunks(z.shape[2], chunk_frames):
        heads.append(vae.decoder.head(vae.post_quant_conv(z[:, :, s:e]), cache))
        cache.seen += e - s
    return torch.cat(heads, dim=2) if len(heads) > 1 else heads[0]


def decode_tiles(
    vae: WanVAE,
    heads: Tensor,
    tiles: list[Tile],
    band: tuple[int, int],
    after_chunk: Callable[[], None] | None = None,
    chunk_frames: int = 1,
) -> Tensor:
    """The decoder's upper part over ``tiles`` of the head outputs ``heads`` (B, C, f, h, w) (from
    :func:`decode_heads`), each tile all chunks with its own causal cache -> the pixels of latent rows
    ``band`` = (a, b) that the tiles cover: (B, 3, 4(f - 1) + 1, s (b - a), s w)."""
    stride = vae.config.spatial_stride
    b, _, f, _, w = heads.shape
    top, bottom = band
    frames = vae.config.temporal_stride * (f - 1) + 1
    video = heads.new_empty(b, vae.config.video_out_channels, frames, stride * (bottom - top), stride * w)
    for t, start, pixels in iter_tile_pixels(vae, heads, tiles, chunk_frames):
        (r0, r1), (c0, c1) = t.rows, t.cols
        rows = slice(stride * (r0 - top), stride * (r1 - top))
        video[:, :, start : start + pixels.shape[2], rows, stride * c0 : stride * c1] = pixels
        del pixels
        if after_chunk is not None:
            after_chunk()
    return video


def iter_tile_pixels(
    vae: WanVAE, heads: Tensor, tiles: list[Tile], chunk_frames: int = 1
) -> Iterator[tuple[Tile, int, Tensor]]:
    """Tile by tile (one tile's causal cache alive at a time), chunk by chunk: (the tile, its first
    video frame, its own pixels (B, 3, T, s rows, s cols)) from the head outputs ``heads``."""
    decoder = vae.decoder
    stride = vae.config.spatial_stride
    scratch = Scratch()  # the CPU convolutions' work buffers, shared by the tiles
    for t in tiles:
        cache = CausalCache(scratch=scratch)
        start = 0
        for s, e in _chunks(heads.shape[2], chunk_frames):
            pixels = _crop(_finish(vae, decoder.upper(_region(heads[:, :, s:e], t), cache)), t, stride)
            cache.seen += e - s
            yield t, start, pixels
            start += pixels.shape[2]


def upper_cache_bytes(decoder: Decoder3d, tiles: list[Tile], itemsize: int) -> int:
    """The causal caches of the upper part for ``tiles`` all alive at once (a chunk-by-chunk tiled
    decode keeps every tile's): 2 frames per temporal convolution over each tile's region."""
    per_pixel, scale = 0, 1
    for block in decoder.up_blocks:
        for m in block.modules():
            if isinstance(m, CausalConv3d) and m.time_pad > 0:
                per_pixel += m.time_pad * m.in_channels * scale**2
        if block.upsampler is not None:
            scale *= 2
    per_pixel += decoder.conv_out.time_pad * decoder.conv_out.in_channels * scale**2
    area = sum((t.region_rows[1] - t.region_rows[0]) * (t.region_cols[1] - t.region_cols[0]) for t in tiles)
    return per_pixel * area * itemsize


def iter_decode_tiled(vae: WanVAE, z: Tensor, tile: TileSpec, chunk_frames: int = 1) -> Iterator[Tensor]:
    """:meth:`WanVAE.iter_decode`, tiled: the pixel frames of raw latents (B, z_dim, f, h, w) in order,
    (B, 3, 1, s h, s w) for the first latent frame, then (B, 3, 4c, s h, s w) per ``chunk_frames`` (c)
    latent frames, each chunk decoded tile by tile (every tile with its own causal cache, kept from
    chunk to chunk). Bad input raises here, not at the first ``next``."""
    _check(vae, z, chunk_frames)
    split_tiles(z.shape[3], z.shape[4], tile, 0)  # checks the tiling
    return _iter_decode_tiled(vae, z, tile, chunk_frames)


def _iter_decode_tiled(vae: WanVAE, z: Tensor, tile: TileSpec, chunk_frames: int) -> Iterator[Tensor]:
    decoder = vae.decoder
    tiles = split_tiles(z.shape[3], z.shape[4], tile, decoder_halo(decoder))
    stride = vae.config.spatial_stride
    scratch = Scratch()
    head_cache = CausalCache(scratch=scratch)
    caches = [CausalCache(scratch=scratch) for _ in tiles]
    for s, e in _chunks(z.shape[2], chunk_frames):
        head = decoder.head(vae.post_quant_conv(z[:, :, s:e]), head_cache)
        head_cache.seen += e - s
        frames: Tensor | None = None
        for t, cache in zip(tiles, caches):
            pixels = _crop(_finish(vae, decoder.upper(_region(head, t), cache)), t, stride)
            cache.seen += e - s
            if frames is None:
                frames = pixels.new_empty(*pixels.shape[:3], stride * z.shape[3], stride * z.shape[4])
            (r0, r1), (c0, c1) = t.rows, t.cols
            frames[:, :, :, stride * r0 : stride * r1, stride * c0 : stride * c1] = pixels
        del head
        assert frames is not None
        yield frames


def encode_tiled(vae: WanVAE, video: Tensor, tile: TileSpec, chunk_latents: int = 1) -> LatentDistribution:
    """:meth:`WanVAE.encode`, tiled: (B, 3, F, H, W) in [-1, 1] -> the same posterior over
    (B, z_dim, (F - 1)/4 + 1, H/s, W/s), s = spatial_stride, up to float rounding.

    The encoder's high-resolution part (``conv_in`` and the downsampling levels, convolutions only)
    runs tile by tile, ``tile`` (a :data:`TileSpec`, in latent pixels) plus :func:`encoder_halo` latent pixels
    per side (all chunks of a tile with its own causal cache), and its latent-resolution outputs are
    put together; the mid block (attention over the whole frame) and the output head then run on the
    whole latent, chunk by chunk.
    """
    cfg = vae.config
    encoder = vae.encoder
    if video.ndim != 5 or video.shape[1] != cfg.video_in_channels:
        raise ValueError(f"video must be (B, {cfg.video_in_channels}, F, H, W), got {tuple(video.shape)}")
    if chunk_latents < 1:
        raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
    if video.shape[3] % cfg.spatial_stride or video.shape[4] % cfg.spatial_stride:
        raise ValueError(f"height and width must be multiples of {cfg.spatial_stride}")
    if (video.shape[2] - 1) % cfg.temporal_stride:
        raise ValueError(f"the number of frames must be {cfg.temporal_stride}k + 1, got {video.shape[2]}")
    stride = cfg.spatial_stride
    h, w = video.shape[3] // stride, video.shape[4] // stride
    tiles = split_tiles(h, w, tile, encoder_halo(encoder))
    frames = video.shape[2]
    step = cfg.temporal_stride * chunk_latents
    starts = [0, *range(1, frames, step)]
    ranges = list(zip(starts, [*starts[1:], frames]))
    lows: list[Tensor] = []  # per chunk: the lower part's output over the whole latent
    scratch = Scratch()
    for t in tiles:
        cache = CausalCache(scratch=scratch)
        (a, b), (c, d) = t.region_rows, t.region_cols
        for i, (s, e) in enumerate(ranges):
            x = patchify(video[:, :, s:e, stride * a : stride * b, stride * c : stride * d], cfg.patch)
            y = encoder.lower(x, cache)
            cache.seen += e - s
            if i == len(lows):
                lows.append(y.new_empty(*y.shape[:3], h, w))
            (r0, r1), (c0, c1) = t.rows, t.cols
            lows[i][:, :, :, r0:r1, c0:c1] = y[:, :, :, r0 - a : r1 - a, c0 - c : c1 - c]
    cache = CausalCache(scratch=scratch)
    moments = []
    for (s, e), low in zip(ranges, lows):
        moments.append(encoder.head(low, cache))
        cache.seen += e - s
    del lows
    return LatentDistribution.from_moments(vae.quant_conv(torch.cat(moments, dim=2)))


__all__ = [
    "Tile",
    "TileGrid",
    "TileSpec",
    "balanced_sizes",
    "decode_heads",
    "decode_tiled",
    "decode_tiles",
    "decoder_halo",
    "encode_tiled",
    "encoder_halo",
    "iter_decode_tiled",
    "iter_tile_pixels",
    "lower_bytes_per_pixel",
    "plan_encode_tiles",
    "plan_tiles",
    "split_tiles",
    "upper_bytes_per_pixel",
    "upper_cache_bytes",
    "upper_reach",
    "upper_scale",
]
