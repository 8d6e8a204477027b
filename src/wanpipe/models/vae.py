"""The Wan video VAEs: causal 3-D convolutional autoencoders (Wan 2.1 and Wan 2.2's residual VAE).

This file holds the model: :class:`VAEConfig` (the checkpoint's ``config.json``),
:class:`LatentDistribution` (the encoder's posterior), :class:`Encoder3d`, :class:`Decoder3d` and
:class:`WanVAE`, which encodes and decodes chunk by chunk. The layers they are built from are in
:mod:`wanpipe.models.vae_layers`.

A video of ``1 + 4k`` frames maps to ``1 + k`` latent frames with ``z_dim`` channels, ``spatial_stride``
times smaller in height and width. Every temporal convolution is causal (it only looks at past
frames), so a video is encoded and decoded chunk by chunk: each causal layer keeps the last input
frames of the previous chunk in an explicit :class:`~wanpipe.models.vae_layers.CausalCache`, created
per ``encode``/``decode`` call. The first frame is special: it is encoded alone and decoded without
temporal upsampling.

- Wan 2.1: ``z_dim`` 16, 8x spatial stride, RGB in and out.
- Wan 2.2 (TI2V-5B, ``is_residual=True, patch_size=2``): every 2x2 pixel patch is folded into the
  channels first (3 -> 12 channels, ``patchify``), each encoder level adds a parameter-free
  shortcut that averages space/time blocks into channels (``AvgDown3d``), each decoder level one
  that spreads channels back into space/time (``DupUp3d``); the decoder is wider than the
  encoder (``decoder_base_dim``). ``z_dim`` 48, 16x spatial stride.

Same numerics as diffusers' ``AutoencoderKLWan``; parameter names follow diffusers' checkpoints except
for the few renames of the VAE key table (``weights/vae_keys.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanpipe.models.vae_layers import (
    CausalCache,
    CausalConv3d,
    MidBlock,
    Resample,
    ResampleMode,
    ResidualBlock,
    ResidualDownBlock,
    RMSNorm,
    UpBlock,
    patchify,
    unpatchify,
)

# diffusers' defaults: the Wan 2.1 VAE's per-channel latent statistics.
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
# Wan 2.2's 48-channel VAE (TI2V-5B): the original ``Wan2_2_VAE``'s mean and std (wan/modules/vae2_2.py).
WAN22_LATENTS_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.157, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.052, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEConfig:
    """The keys of diffusers' ``vae/config.json`` (``AutoencoderKLWan``), with its defaults.

    ``temperal_downsample`` keeps the checkpoint's spelling. Lists become tuples.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None  # Wan 2.2: the decoder is wider than the encoder
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False  # Wan 2.2
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None  # Wan 2.2
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8
    clip_output: bool = True  # clamp decoded pixels to [-1, 1]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        """Build from a parsed ``config.json``; ``_``-prefixed and unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if not k.startswith("_") and k in names})

    def __post_init__(self) -> None:
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_base_dim is not None and self.decoder_base_dim < 1:
            raise ValueError(f"VAEConfig.decoder_base_dim must be >= 1 or None, got {self.decoder_base_dim}")
        if not self.dim_mult or any(m < 1 for m in self.dim_mult):
            raise ValueError(f"VAEConfig.dim_mult must be non-empty positive ints, got {self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"VAEConfig.temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                f"entries, got {len(self.temperal_downsample)}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"VAEConfig.latents_mean ({len(self.latents_mean)}) and latents_std "
                f"({len(self.latents_std)}) must both have z_dim = {self.z_dim} entries"
            )
        if any(s <= 0 for s in self.latents_std):
            raise ValueError("VAEConfig.latents_std must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VAEConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"VAEConfig.patch_size must be >= 1 or None, got {self.patch_size}")
        area = self.patch**2
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % area:
                raise ValueError(
                    f"VAEConfig.{name}={getattr(self, name)} must be a multiple of patch_size**2 = {area} "
                    "(the channels of a patchified video)"
                )
        if self.is_residual:
            self._check_residual_shortcuts()
        if self.scale_factor_temporal is not None and self.scale_factor_temporal != self.temporal_stride:
            raise ValueError(
                f"VAEConfig.scale_factor_temporal={self.scale_factor_temporal} disagrees with "
                f"temperal_downsample={self.temperal_downsample} (stride {self.temporal_stride})"
            )
        if self.scale_factor_spatial is not None and self.scale_factor_spatial != self.spatial_stride:
            raise ValueError(
                f"VAEConfig.scale_factor_spatial={self.scale_factor_spatial} disagrees with dim_mult and "
                f"patch_size (stride {self.spatial_stride})"
            )

    def _check_residual_shortcuts(self) -> None:
        """The residual shortcuts move whole space/time blocks into channel groups: the sizes must divide."""
        last = len(self.dim_mult) - 1
        enc = [self.base_dim * m for m in (1, *self.dim_mult)]
        dec_base = self.decoder_base_dim or self.base_dim
        dec = [dec_base * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        temporal_up = self.temperal_downsample[::-1]
        for i in range(last + 1):
            resample = i != last
            factor = (2 if resample and self.temperal_downsample[i] else 1) * (4 if resample else 1)
            if (enc[i] * factor) % enc[i + 1]:
                raise ValueError(
                    f"VAEConfig: encoder level {i} cannot average {enc[i]} channels x {factor} "
                    f"space/time positions into {enc[i + 1]} channels (dim_mult={self.dim_mult})"
                )
        for i in range(last):  # the last decoder level does not upsample: no shortcut
            factor = (2 if temporal_up[i] else 1) * 4
            if (dec[i + 1] * factor) % dec[i]:
                raise ValueError(
                    f"VAEConfig: decoder level {i} cannot spread {dec[i]} channels over {dec[i + 1]} "
                    f"channels x {factor} space/time positions (dim_mult={self.dim_mult})"
                )

    @property
    def patch(self) -> int:
        """Side of the pixel patches folded into channels before encoding (1: none, 2 for Wan 2.2)."""
        return self.patch_size or 1

    @property
    def video_in_channels(self) -> int:
        """Channels of the videos ``encode`` takes (3): ``in_channels`` before patchifying."""
        return self.in_channels // self.patch**2

    @property
    def video_out_channels(self) -> int:
        """Channels of the videos ``decode`` makes (3): ``out_channels`` after unpatchifying."""
        return self.out_channels // self.patch**2

    @property
    def temporal_stride(self) -> int:
        """Pixel frames per latent frame after the first (4 for Wan)."""
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent pixel along height and width (8 for Wan 2.1, 16 for Wan 2.2)."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch


# ----------------------------------------------------------------------------------------------
# The posterior
# ----------------------------------------------------------------------------------------------


@dataclass
class LatentDistribution:
    """The encoder's diagonal Gaussian posterior; ``mean``, ``logvar``: (B, z_dim, f, h, w).

    ``logvar`` is clamped to [-30, 20] as in the reference.
    """

    mean: Tensor
    logvar: Tensor

    @classmethod
    def from_moments(cls, moments: Tensor) -> LatentDistribution:
        """Split (B, 2 * z_dim, f, h, w) encoder moments into mean and log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        """The most likely latents, i.e. the mean: (B, z_dim, f, h, w)."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw latents ``mean + std * noise``: (B, z_dim, f, h, w)."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise


# ----------------------------------------------------------------------------------------------
# Encoder and decoder
# ----------------------------------------------------------------------------------------------


def _register_cache_keys(root: nn.Module) -> None:
    """Name every stateful layer's cache slot after its path under ``root``."""
    for name, module in root.named_modules():
        if isinstance(module, (CausalConv3d, Resample)):
            module.cache_key = name


class Encoder3d(nn.Module):
    """Patchified video -> latent moments.

    Wan 2.1 layout: a flat list of residual and resample blocks. Wan 2.2 (``is_residual``): one
    :class:`ResidualDownBlock` per level.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        # every level but the last halves height and width, and time where temperal_downsample says so
        modes: list[ResampleMode | None] = [
            *("downsample3d" if t else "downsample2d" for t in config.temperal_downsample),
            None,
        ]
        self.conv_in = CausalConv3d(config.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for in_dim, out_dim, mode in zip(dims[:-1], dims[1:], modes):
            if config.is_residual:
                blocks.append(ResidualDownBlock(in_dim, out_dim, config.num_res_blocks, config.dropout, mode))
                continue
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                in_dim = out_dim
            if mode is not None:
                blocks.append(Resample(out_dim, mode))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], config.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, 3, padding=1)
        _register_cache_keys(self)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """(B, in_channels, T, H, W) -> (B, 2 * z_dim, T', H / s, W / s), s = 2 ** (len(dim_mult) - 1).

        One chunk of the (patchified) video: T = 1 + 4n in the first chunk (T' = 1 + n), T = 4n after
        (T' = n).
        """
        frames = x.shape[2]
        x = self.head(self.lower(x, cache), cache)
        cache.seen += frames
        return x

    def lower(self, x: Tensor, cache: CausalCache) -> Tensor:
        """``conv_in`` and the downsampling levels, convolutions only (no attention), so exact on a
        spatial tile given enough halo (:mod:`wanpipe.models.vae_tiling`):
        (B, in_channels, T, H, W) -> (B, C, T', H / s, W / s). Does not advance ``cache.seen``."""
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        return x

    def head(self, x: Tensor, cache: CausalCache) -> Tensor:
        """The mid block (its attention sees each whole frame) and the output head, at the latent
        resolution: (B, C, T', h, w) -> (B, 2 * z_dim, T', h, w). Does not advance ``cache.seen``."""
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True), cache)


class Decoder3d(nn.Module):
    """Latents -> patchified video. Like diffusers', it has no attention outside the mid block.

    Wan 2.1 layout: each upsampler halves the channels. Wan 2.2 (``is_residual``): upsamplers keep the
    channels and each level that upsamples has a ``DupUp3d`` shortcut (:class:`UpBlock`).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dim = config.decoder_base_dim or config.base_dim
        mult = config.dim_mult
        dims = [dim * m for m in (mult[-1], *mult[::-1])]
        # the encoder's resampling, mirrored
        modes: list[ResampleMode | None] = [
            *("upsample3d" if t else "upsample2d" for t in config.temperal_downsample[::-1]),
            None,
        ]
        self.conv_in = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], config.dropout)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim, mode) in enumerate(zip(dims[:-1], dims[1:], modes)):
            if i > 0 and not config.is_residual:
                in_dim //= 2  # the previous (Wan 2.1) upsampler halved the channels
            blocks.append(
                UpBlock(
                    in_dim, out_dim, config.num_res_blocks, config.dropout, mode, residual=config.is_residual
                )
            )
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], config.out_channels, 3, padding=1)
        self.piece_frames: int | None = 4
        """The default of ``forward``/``upper``'s ``piece_frames`` (a low-memory CPU decode sets fewer, ``stages.decode.DecodePlan``)."""
        _register_cache_keys(self)

    def forward(self, x: Tensor, cache: CausalCache, piece_frames: int | None | str = "default") -> Tensor:
        """(B, z_dim, t, h, w) -> (B, out_channels, T, s h, s w), s = 2 ** (len(dim_mult) - 1).

        One chunk of latents: T = 1 + 4(t - 1) in the first chunk, T = 4t after. After the video's first
        chunk, a level whose input has more than ``piece_frames`` frames runs it, and every level above,
        on consecutive pieces of that many frames: every layer is causal with its own cache, so the
        result is the same, while the wide high-resolution levels hold a few frames at a time and the
        narrow low-resolution ones take the whole chunk (bigger time groups for the CPU convolutions).
        ``"default"``: :attr:`piece_frames` (4; 1 in a low-memory CPU decode).
        """
        frames = x.shape[2]
        x = self.upper(self.head(x, cache), cache, piece_frames)
        cache.seen += frames
        return x

    def head(self, x: Tensor, cache: CausalCache) -> Tensor:
        """The low-resolution head, ``conv_in`` and the mid block (its attention sees each whole frame):
        (B, z_dim, t, h, w) -> (B, C, t, h, w). Does not advance ``cache.seen``."""
        return self.mid_block(self.conv_in(x, cache), cache)

    def upper(self, x: Tensor, cache: CausalCache, piece_frames: int | None | str = "default") -> Tensor:
        """The upsampling levels and the output head, convolutions only (no attention), so exact on
        a spatial tile given enough halo (:mod:`wanpipe.models.vae_tiling`):
        (B, C, t, h, w) -> (B, out_channels, T, s h, s w). Does not advance ``cache.seen``."""
        if piece_frames == "default":
            piece_frames = self.piece_frames
        assert piece_frames is None or isinstance(piece_frames, int)
        return self._upper(x, cache, 0, None if cache.first_chunk else piece_frames)

    def _upper(self, x: Tensor, cache: CausalCache, start: int, piece_frames: int | None) -> Tensor:
        """``up_blocks[start:]``, then the output head, on (B, C, T, H, W), in time pieces where too long."""
        for i in range(start, len(self.up_blocks)):
            if piece_frames is not None and x.shape[2] > piece_frames:
                pieces = x.split(piece_frames, dim=2)
                return torch.cat([self._upper(p, cache, i, piece_frames) for p in pieces], dim=2)
            x = self.up_blocks[i](x, cache)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True), cache)


# ----------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """The Wan VAE (2.1, or 2.2's residual one): ``encode`` videos to latents, ``decode`` latents to
    videos, chunk by chunk.

    Videos are (B, 3, F, H, W) in [-1, 1]; with ``patch_size`` p they are patchified to
    ``in_channels`` = 3 p^2 channels before the encoder and unpatchified after the decoder. Latents
    here are raw (what the encoder makes); the diffusion model works on ``normalize_latents(raw)``.
    Run under ``torch.inference_mode()`` for inference: the model does not switch autograd off itself.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if config.attn_scales:
            # Wan's original code puts attention blocks at these scales in the encoder and decoder;
            # diffusers' port does not run them. No released checkpoint uses them.
            raise NotImplementedError(f"attention at attn_scales={config.attn_scales} is not implemented")
        self.config = config
        self.encoder = Encoder3d(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    # -- encode ---------------------------------------------------------------------------------

    def encode(self, video: Tensor, chunk_latents: int = 1) -> LatentDistribution:
        """(B, 3, F, H, W) in [-1, 1], F = 4k + 1 -> posterior over (B, z_dim, k + 1, H/s, W/s), s = spatial_stride.

        As in the reference, the first frame is encoded alone, then 4 frames at a time
        (``4 * chunk_latents`` frames at a time, same result, for fewer and bigger steps).
        """
        cfg = self.config
        channels = cfg.video_in_channels
        if video.ndim != 5 or video.shape[1] != channels:
            raise ValueError(f"video must be (B, {channels}, F, H, W), got {tuple(video.shape)}")
        _, _, frames, height, width = video.shape
        ts, ss = cfg.temporal_stride, cfg.spatial_stride
        if frames < 1 or (frames - 1) % ts:
            raise ValueError(
                f"the number of frames must be {ts}k + 1 (1, {ts + 1}, {2 * ts + 1}, ...), got {frames}"
            )
        if height % ss or width % ss:
            raise ValueError(f"height and width must be multiples of {ss}, got {height}x{width}")
        if chunk_latents < 1:
            raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
        cache = CausalCache()
        step = ts * chunk_latents
        starts = [0, *range(1, frames, step)]
        ends = [*starts[1:], frames]
        moments = [self.encoder(patchify(video[:, :, s:e], cfg.patch), cache) for s, e in zip(starts, ends)]
        return LatentDistribution.from_moments(self.quant_conv(torch.cat(moments, dim=2)))

    def encode_mean(self, video: Tensor) -> Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> raw latents (B, z_dim, (F - 1)/4 + 1, H/s, W/s), the posterior mode."""
        return self.encode(video).mean

    # -- decode ---------------------------------------------------------------------------------

    def decode_chunk(self, z: Tensor, cache: CausalCache) -> Tensor:
        """Decode the next chunk of raw latents, continuing from ``cache`` (updated in place).

        (B, z_dim, t, h, w) -> (B, 3, T, s h, s w), s = spatial_stride, with T = 1 + 4(t - 1) for the
        first chunk of a video (an empty cache) and T = 4t after.
        """
        x = unpatchify(self.decoder(self.post_quant_conv(z), cache), self.config.patch)
        return x.clamp(-1.0, 1.0) if self.config.clip_output else x

    def iter_decode(self, z: Tensor, chunk_frames: int = 1) -> Iterator[Tensor]:
        """Yield the pixel frames of raw latents (B, z_dim, f, h, w) in order: the first latent frame
        alone, (B, 3, 1, s h, s w) (as the reference decodes it), then ``chunk_frames`` (c) latent frames
        at a time, (B, 3, 4c, s h, s w) (the last chunk may be shorter).

        Memory is bounded by one chunk plus the cache (2 frames per causal layer). Bad input raises
        here, not at the first ``next``.
        """
        self._check_latents(z)
        if z.shape[2] < 1:
            raise ValueError("latents have no frames")
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        return self._iter_decode(z, chunk_frames)

    def _iter_decode(self, z: Tensor, chunk_frames: int) -> Iterator[Tensor]:
        cache = CausalCache()
        for start in [0, *range(1, z.shape[2], chunk_frames)]:
            end = 1 if start == 0 else start + chunk_frames
            yield self.decode_chunk(z[:, :, start:end], cache)

    def decode(
        self, z: Tensor, chunk_frames: int = 1, after_chunk: Callable[[], None] | None = None
    ) -> Tensor:
        """Raw latents (B, z_dim, f, h, w) -> video (B, 3, 4(f - 1) + 1, s h, s w) in [-1, 1], s = spatial_stride.

        ``after_chunk()`` runs after each chunk (the executor returns freed host memory there)."""
        frames = self.config.temporal_stride * (z.shape[2] - 1) + 1 if z.ndim == 5 else 0
        video: Tensor | None = None
        start = 0
        for chunk in self.iter_decode(z, chunk_frames):
            if video is None:  # allocated once: no second copy of the video for a final cat
                b, c, _, h, w = chunk.shape
                video = chunk.new_empty(b, c, frames, h, w)
            video[:, :, start : start + chunk.shape[2]] = chunk
            start += chunk.shape[2]
            del chunk
            if after_chunk is not None:
                after_chunk()
        assert video is not None and start == frames
        return video

    # -- latent statistics ----------------------------------------------------------------------

    def _check_latents(self, z: Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be (B, {self.config.z_dim}, f, h, w), got {tuple(z.shape)}")

    def _latent_stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self._check_latents(z)
        cfg = self.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape).to(z.device, z.dtype)
        return mean, inv_std

    def normalize_latents(self, z: Tensor) -> Tensor:
        """Raw latents -> the diffusion model's: ``(z - mean) / std``, (B, z_dim, f, h, w) -> same.

        Computed as diffusers' pipelines do, ``(z - mean) * (1 / std)`` in ``z``'s dtype.
        """
        mean, inv_std = self._latent_stats(z)
        return (z - mean) * inv_std

    def denormalize_latents(self, z: Tensor) -> Tensor:
        """The diffusion model's latents -> raw: ``z * std + mean``, (B, z_dim, f, h, w) -> same.

        Computed as diffusers' pipelines do, ``z / (1 / std) + mean`` in ``z``'s dtype.
        """
        mean, inv_std = self._latent_stats(z)
        return z / inv_std + mean


__all__ = ["LatentDistribution", "VAEConfig", "WanVAE"]
