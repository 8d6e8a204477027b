"""The Wan video VAEs: causal 3-D convolutional autoencoders (Wan 2.1 and Wan 2.2's residual VAE).

A video of ``1 + 4k`` frames maps to ``1 + k`` latent frames with ``z_dim`` channels, ``spatial_stride``
times smaller in height and width. Every temporal convolution is causal (it only looks at past
frames), so a video is encoded and decoded chunk by chunk: each causal layer keeps the last input
frames of the previous chunk in an explicit :class:`CausalCache`, created per ``encode``/``decode``
call. The first frame is special: it is encoded alone and decoded without temporal upsampling.

- Wan 2.1: ``z_dim`` 16, 8x spatial stride, RGB in and out.
- Wan 2.2 (TI2V-5B, ``is_residual=True, patch_size=2``): every 2x2 pixel patch is folded into the
  channels first (3 -> 12 channels, :func:`patchify`), each encoder level adds a parameter-free
  shortcut that averages space/time blocks into channels (:class:`AvgDown3d`), each decoder level one
  that spreads channels back into space/time (:class:`DupUp3d`); the decoder is wider than the
  encoder (``decoder_base_dim``). ``z_dim`` 48, 16x spatial stride.

Same numerics as diffusers' ``AutoencoderKLWan``; parameter names follow diffusers' checkpoints except
for the few renames of the VAE key table (``weights/vae_keys.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanpipe.models.fastconv import (
    CHANNELS_LAST,
    ConvWeightCache,
    PhaseKernels,
    Scratch,
    causal_conv3x3x3,
    cpu_fp32_inference,
    fast_conv_applies,
    upsample2x_conv3x3,
    upsample_conv_applies,
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
# Temporal cache and posterior
# ----------------------------------------------------------------------------------------------


@dataclass
class CausalCache:
    """What the causal layers of one encoder or decoder carry from one chunk to the next.

    ``frames[key]`` holds the last input frames of the layer whose ``cache_key`` is ``key`` (a
    module path such as ``"up_blocks.0.resnets.1.conv1"``): at most 2 frames per layer, so the cache
    is bounded whatever the video length. ``seen`` counts the input frames already processed; the
    first chunk (``seen == 0``) is where the first frame gets its special treatment. ``scratch``
    holds the CPU convolutions' work buffers, reused from layer to layer and chunk to chunk. Make a
    fresh cache for every video.
    """

    frames: dict[str, Tensor] = field(default_factory=dict)
    seen: int = 0
    scratch: Scratch = field(default_factory=Scratch)

    @property
    def first_chunk(self) -> bool:
        return self.seen == 0

    def nbytes(self) -> int:
        """Memory held by the cached frames."""
        return sum(t.numel() * t.element_size() for t in self.frames.values())


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
# Layers
# ----------------------------------------------------------------------------------------------


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution padded with ``2 * padding[0]`` zero frames in the past and none in the future.

    With a cache, the past frames are the last ones of the previous chunk instead of zeros, so
    running chunk by chunk equals running on the whole video.
    """

    cache_key: str = ""  # set by the encoder / decoder that owns the layer

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pt, ph, pw = _triple(padding)
        # Spatial zero padding is done by the convolution itself (no padded copy of the input);
        # the causal time padding is past frames (cache) or zeros, concatenated in front.
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt
        self.fast_cache = ConvWeightCache()

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """(B, C_in, T, H, W) -> (B, C_out, T', H', W'); T' = T for stride 1."""
        time_pad = self.time_pad
        past = None
        if cache is not None and time_pad > 0:
            if not self.cache_key:
                raise RuntimeError(
                    "CausalConv3d has no cache_key: it is not registered with an encoder/decoder"
                )
            past = cache.frames.get(self.cache_key)
            if past is not None:
                time_pad -= past.shape[2]
        if fast_conv_applies(x, self.weight, self.stride, self.padding) and self.time_pad == 2:
            # CPU fp32: time-Winograd; past frames and causal zeros are not concatenated (see fastconv).
            scratch = cache.scratch if cache is not None else None
            y = causal_conv3x3x3(x, self.weight, self.bias, self.fast_cache, past, time_pad, scratch)
        else:
            xp = x if past is None else torch.cat([past, x], dim=2)
            if time_pad > 0:
                xp = torch.cat([xp.new_zeros(*xp.shape[:2], time_pad, *xp.shape[3:]), xp], dim=2)
            y = self._convolve(xp)
        if cache is not None and self.time_pad > 0:
            self._keep_last_frames(x, past, cache)
        return y

    def _keep_last_frames(self, x: Tensor, past: Tensor | None, cache: CausalCache) -> None:
        """Cache the last ``time_pad`` input frames for the next chunk, after the convolution has read
        ``past``: into ``past``'s own memory when it fits (no fresh allocation per chunk)."""
        keep = self.time_pad
        if x.shape[2] >= keep:
            last = x[:, :, -keep:]
            if past is not None and past.shape == last.shape and past.dtype == last.dtype:
                past.copy_(last)
            else:
                cache.frames[self.cache_key] = last.clone()
        elif past is not None:
            cache.frames[self.cache_key] = torch.cat([past, x], dim=2)[:, :, -keep:].clone()
        else:
            cache.frames[self.cache_key] = x.clone()

    def _convolve(self, x: Tensor) -> Tensor:
        """The convolution. On the CPU in fp32, oneDNN directly: PyTorch's dispatch heuristic sends
        inputs with few channels x frames (the first, single-frame chunk of every layer) to its
        im2col kernel, which is 3-4x slower here and allocates a column buffer of 27x the input."""
        if cpu_fp32_inference(x, self.weight):
            return torch.ops.aten.mkldnn_convolution(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super().forward(x)


def _conv2d(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)``, (N, C, H, W) -> (N, K, H', W'); through oneDNN directly on the CPU in fp32 (see
    :meth:`CausalConv3d._convolve`), which keeps a channels-last input channels-last."""
    if cpu_fp32_inference(x, conv.weight):
        padding = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
        return torch.ops.aten.mkldnn_convolution(
            x, conv.weight, conv.bias, padding, conv.stride, conv.dilation, conv.groups
        )
    return conv(x)


class RMSNorm(nn.Module):
    """Channel RMS norm: ``x / ||x||_channels * sqrt(dim) * gamma``, in fp32 for low precision."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, [T,] H, W) -> same shape."""
        low_precision = x.is_floating_point() and x.dtype.itemsize < 4
        xf = x.float() if low_precision else x
        # F.normalize's eps (1e-12) is kept; both norms equal F.normalize's to ~1e-7 relative.
        if xf.dim() == 5 and xf.is_contiguous(memory_format=CHANNELS_LAST):
            # Channels innermost (the CPU path): a contiguous reduction, no squared copy of x.
            norm = torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min_(1e-12)
        else:
            # Channels outermost: a sum of squares over dim 1 vectorises over the pixels (~3x faster on
            # the CPU than the strided vector norm).
            norm = xf.square().sum(1, keepdim=True).sqrt_().clamp_min_(1e-12)
        if xf is x:  # fp32: scale folded into the per-pixel factor, one full pass fewer
            return torch.mul(x, norm.reciprocal_().mul_(self.scale)).mul_(self.gamma)
        normalized = xf.div(norm).to(x.dtype)
        return normalized.mul_(self.scale).mul_(self.gamma)


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """(B, in_dim, T, H, W) -> (B, out_dim, T, H, W)."""
        out = self.conv1(F.silu(self.norm1(x), inplace=True), cache)
        out = self.conv2(self.dropout(F.silu(self.norm2(out), inplace=True)), cache)
        # The shortcut last, so its output is not held while the convolutions run.
        return out.add_(self.conv_shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, C, T, H, W); frames are independent, so no cache."""
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(y)).flatten(2).transpose(1, 2).unsqueeze(1)  # (BT, 1, HW, 3C)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # (BT, 1, HW, C)
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return y.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + x


ResampleMode = Literal["upsample2d", "upsample3d", "downsample2d", "downsample3d"]


class Resample(nn.Module):
    """2x spatial up/down sampling per frame, plus 2x temporal up/down sampling for the 3d modes.

    Temporal upsampling turns every frame but the video's first into two (a causal conv makes
    ``2 * dim`` channels, split into two frames). Temporal downsampling keeps the first frame and
    then takes a stride-2 conv over ``[previous frame, f1, f2]`` windows, so it halves the 4k frames
    that follow the first.
    """

    cache_key: str = ""  # set by the encoder / decoder that owns the layer

    def __init__(self, dim: int, mode: ResampleMode, out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        self.phase_kernels = PhaseKernels()  # the CPU path of the upsampling convolution
        if mode.startswith("upsample"):
            self.conv = nn.Conv2d(dim, dim // 2 if out_dim is None else out_dim, 3, padding=1)
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            self.conv = nn.Conv2d(dim, dim, 3, stride=2)
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """(B, C, T, H, W) -> (B, C', T', 2H, 2W) up or (B, C, T', H/2, W/2) down.

        T' = T for the 2d modes; for upsample3d T' = 2T (2T - 1 in the first chunk); for downsample3d
        T' = T/2 (1 + (T - 1)/2 in the first chunk).
        """
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        if self.mode.startswith("upsample") and upsample_conv_applies(y, self.conv.weight):
            y = upsample2x_conv3x3(y, self.conv.weight, self.conv.bias, self.phase_kernels)
        elif self.mode.startswith("upsample"):
            y = F.interpolate(y.float(), scale_factor=2.0, mode="nearest-exact").type_as(y)
            y = _conv2d(self.conv, y)
        else:
            y = _conv2d(self.conv, F.pad(y, (0, 1, 0, 1)))
        x = y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: Tensor, cache: CausalCache) -> Tensor:
        head = None
        if cache.first_chunk:  # the video's first frame is not upsampled in time
            head, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2] > 0:
            y = self.time_conv(x, cache)  # (B, 2C, T, H, W): the two frames of each input frame
            b, c2, t, h, w = y.shape
            if y.is_contiguous(memory_format=CHANNELS_LAST):  # interleave, staying channels-last
                x = torch.empty(
                    b, c2 // 2, 2 * t, h, w, dtype=y.dtype, device=y.device, memory_format=CHANNELS_LAST
                )
                x.permute(0, 2, 3, 4, 1).view(b, t, 2, h, w, c2 // 2).copy_(
                    y.permute(0, 2, 3, 4, 1).view(b, t, h, w, 2, c2 // 2).permute(0, 1, 4, 2, 3, 5)
                )
            else:
                x = (
                    y.reshape(b, 2, c2 // 2, t, h, w)
                    .permute(0, 2, 3, 1, 4, 5)
                    .reshape(b, c2 // 2, 2 * t, h, w)
                )
        if head is None:
            return x
        return torch.cat([head, x], dim=2) if x.shape[2] > 0 else head

    def _downsample_time(self, x: Tensor, cache: CausalCache) -> Tensor:
        if not self.cache_key:
            raise RuntimeError("Resample has no cache_key: it is not registered with an encoder/decoder")
        if cache.first_chunk:  # the first frame passes; it is also the left context of the next window
            out = x[:, :, :1]
            if x.shape[2] > 1:
                out = torch.cat([out, self.time_conv(x)], dim=2)
        else:
            out = self.time_conv(torch.cat([cache.frames[self.cache_key], x], dim=2))
        cache.frames[self.cache_key] = x[:, :, -1:].clone()
        return out


def _residual_blocks(in_dim: int, out_dim: int, count: int, dropout: float) -> nn.ModuleList:
    """``count`` residual blocks, the first from ``in_dim`` channels, all to ``out_dim``."""
    return nn.ModuleList(ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(count))


class MidBlock(nn.Module):
    """Residual block, attention, residual block, at the lowest resolution."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """(B, C, T, H, W) -> (B, C, T, H, W)."""
        x = self.resnets[0](x, cache)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x), cache)
        return x


# ----------------------------------------------------------------------------------------------
# Wan 2.2: patches and the parameter-free residual shortcuts
# ----------------------------------------------------------------------------------------------


def patchify(x: Tensor, patch: int) -> Tensor:
    """Fold each ``patch x patch`` pixel block into the channels, as the Wan 2.2 checkpoints expect.

    ``b c f (h ph) (w pw) -> b (c pw ph) f h w``: (B, C, F, H, W) -> (B, C p^2, F, H/p, W/p). The
    column offset ``pw`` varies slower than the row offset ``ph``.
    """
    if patch == 1:
        return x
    x = x.unflatten(4, (x.shape[4] // patch, patch)).unflatten(3, (x.shape[3] // patch, patch))
    # (b, c, f, h, ph, w, pw) -> (b, c, pw, ph, f, h, w)
    return x.permute(0, 1, 6, 4, 2, 3, 5).flatten(1, 3)


def unpatchify(x: Tensor, patch: int) -> Tensor:
    """The inverse of :func:`patchify`: (B, C p^2, F, H, W) -> (B, C, F, H p, W p)."""
    if patch == 1:
        return x
    x = x.unflatten(1, (x.shape[1] // patch**2, patch, patch))
    # (b, c, pw, ph, f, h, w) -> (b, c, f, h, ph, w, pw)
    return x.permute(0, 1, 4, 5, 3, 6, 2).flatten(5, 6).flatten(3, 4)


class AvgDown3d(nn.Module):
    """Shortcut of a Wan 2.2 encoder level: space/time blocks become channels, averaged in groups.

    Each ``factor_t x factor_s x factor_s`` block of every input channel is laid out as
    ``in_dim * factor`` channels ``(c, t, y, x)``, and each run of ``in_dim * factor / out_dim`` of
    them is averaged into one output channel. A chunk whose frame count is not a multiple of
    ``factor_t`` gets zero frames in front (the video's first frame: ``[0, f0]`` -> one frame).
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.factor_t, self.factor_s = factor_t, factor_s
        if (in_dim * factor_t * factor_s**2) % out_dim:
            raise ValueError(
                f"AvgDown3d: {in_dim} x {factor_t * factor_s**2} channels do not group into {out_dim}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim, T, H, W) -> (B, out_dim, ceil(T / factor_t), H / factor_s, W / factor_s)."""
        ft, fs = self.factor_t, self.factor_s
        if x.shape[2] % ft:
            x = F.pad(x, (0, 0, 0, 0, ft - x.shape[2] % ft, 0))
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (b, c, ft, fs, fs, t', h', w')
        return x.reshape(b, self.out_dim, -1, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp3d(nn.Module):
    """Shortcut of a Wan 2.2 decoder level, the mirror of :class:`AvgDown3d`: each input channel is
    repeated, and the copies are laid out as ``factor_t x factor_s x factor_s`` space/time blocks of
    ``out_dim`` channels. In the video's first chunk the first ``factor_t - 1`` frames are dropped,
    as the temporal upsampler does not double the first frame.
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.factor_t, self.factor_s = factor_t, factor_s
        factor = factor_t * factor_s**2
        if (out_dim * factor) % in_dim:
            raise ValueError(f"DupUp3d: {in_dim} channels do not spread over {out_dim} x {factor}")
        self.repeats = out_dim * factor // in_dim

    def forward(self, x: Tensor, first_chunk: bool) -> Tensor:
        """(B, in_dim, T, H, W) -> (B, out_dim, T', H fs, W fs); T' = T ft, less ft - 1 in the first chunk."""
        ft, fs = self.factor_t, self.factor_s
        b, c, t, h, w = x.shape
        x = x.unsqueeze(2).expand(b, c, self.repeats, t, h, w)  # each channel, repeats times in a row
        x = x.reshape(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first_chunk and ft > 1 else x


class ResidualDownBlock(nn.Module):
    """Wan 2.2 encoder level: residual blocks and an optional downsampler, plus an :class:`AvgDown3d` shortcut."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        dropout: float = 0.0,
        downsample_mode: ResampleMode | None = None,
    ) -> None:
        super().__init__()
        self.resnets = _residual_blocks(in_dim, out_dim, num_res_blocks, dropout)
        self.downsampler = Resample(out_dim, downsample_mode) if downsample_mode is not None else None
        factor_t = 2 if downsample_mode == "downsample3d" else 1
        factor_s = 1 if downsample_mode is None else 2
        self.shortcut = AvgDown3d(in_dim, out_dim, factor_t, factor_s)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """(B, in_dim, T, H, W) -> (B, out_dim, T', H/2, W/2) with a downsampler, else (B, out_dim, T, H, W)."""
        shortcut = self.shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsampler is not None:
            x = self.downsampler(x, cache)
        return x + shortcut


class ResidualUpBlock(nn.Module):
    """Wan 2.2 decoder level: ``num_res_blocks + 1`` residual blocks and an optional upsampler (which
    keeps the channels), plus a :class:`DupUp3d` shortcut when it upsamples."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        dropout: float = 0.0,
        upsample_mode: ResampleMode | None = None,
    ) -> None:
        super().__init__()
        self.resnets = _residual_blocks(in_dim, out_dim, num_res_blocks + 1, dropout)
        self.upsampler: Resample | None = None
        self.shortcut: DupUp3d | None = None
        if upsample_mode is not None:
            self.upsampler = Resample(out_dim, upsample_mode, out_dim=out_dim)
            self.shortcut = DupUp3d(in_dim, out_dim, 2 if upsample_mode == "upsample3d" else 1, 2)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """(B, in_dim, T, H, W) -> (B, out_dim, T', 2H, 2W) with an upsampler, else (B, out_dim, T, H, W)."""
        inputs = x
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is None or self.shortcut is None:
            return x
        return self.upsampler(x, cache) + self.shortcut(inputs, cache.first_chunk)


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
        dim = config.base_dim
        dims = [dim * m for m in (1, *config.dim_mult)]
        self.conv_in = CausalConv3d(config.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last = len(config.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            mode: ResampleMode | None = None
            if i != last:
                mode = "downsample3d" if config.temperal_downsample[i] else "downsample2d"
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
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        x = self.conv_out(F.silu(self.norm_out(x), inplace=True), cache)
        cache.seen += frames
        return x


class UpBlock(nn.Module):
    """``num_res_blocks + 1`` residual blocks, then an optional upsampler (Wan 2.1 layout)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        dropout: float = 0.0,
        upsample_mode: ResampleMode | None = None,
    ) -> None:
        super().__init__()
        self.resnets = _residual_blocks(in_dim, out_dim, num_res_blocks + 1, dropout)
        self.upsampler = Resample(out_dim, upsample_mode) if upsample_mode is not None else None

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """(B, in_dim, T, H, W) -> (B, out_dim // 2, T', 2H, 2W) with an upsampler, else (B, out_dim, T, H, W)."""
        for resnet in self.resnets:
            x = resnet(x, cache)
        return x if self.upsampler is None else self.upsampler(x, cache)


class Decoder3d(nn.Module):
    """Latents -> patchified video. Like diffusers', it has no attention outside the mid block.

    Wan 2.1 layout: each upsampler halves the channels. Wan 2.2 (``is_residual``): upsamplers keep the
    channels and each level has a :class:`DupUp3d` shortcut (:class:`ResidualUpBlock`).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dim = config.decoder_base_dim or config.base_dim
        mult = config.dim_mult
        dims = [dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = config.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], config.dropout)
        blocks: list[nn.Module] = []
        last = len(mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            mode: ResampleMode | None = None
            if i != last:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            if config.is_residual:
                blocks.append(ResidualUpBlock(in_dim, out_dim, config.num_res_blocks, config.dropout, mode))
                continue
            if i > 0:
                in_dim //= 2  # the previous upsampler halved the channels
            blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks, config.dropout, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], config.out_channels, 3, padding=1)
        _register_cache_keys(self)

    def forward(self, x: Tensor, cache: CausalCache, piece_frames: int | None = 4) -> Tensor:
        """(B, z_dim, t, h, w) -> (B, out_channels, T, s h, s w), s = 2 ** (len(dim_mult) - 1).

        One chunk of latents: T = 1 + 4(t - 1) in the first chunk, T = 4t after. After the video's first
        chunk, a level whose input has more than ``piece_frames`` frames runs it, and every level above,
        on consecutive pieces of that many frames: every layer is causal with its own cache, so the
        result is the same, while the wide high-resolution levels hold a few frames at a time and the
        narrow low-resolution ones take the whole chunk (bigger time groups for the CPU convolutions).
        """
        frames = x.shape[2]
        x = self.conv_in(x, cache)
        x = self.mid_block(x, cache)
        x = self._upper(x, cache, 0, None if cache.first_chunk else piece_frames)
        cache.seen += frames
        return x

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
        cfg = self.config
        if z.ndim != 5 or z.shape[1] != cfg.z_dim:
            raise ValueError(f"latents must be (B, {cfg.z_dim}, f, h, w), got {tuple(z.shape)}")
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

    def _latent_stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        if z.ndim != 5 or z.shape[1] != cfg.z_dim:
            raise ValueError(f"latents must be (B, {cfg.z_dim}, f, h, w), got {tuple(z.shape)}")
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


__all__ = [
    "CausalCache",
    "LatentDistribution",
    "VAEConfig",
    "WanVAE",
    "patchify",
    "unpatchify",
]
