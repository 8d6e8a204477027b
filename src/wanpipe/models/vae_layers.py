"""The layers of the Wan video VAEs (:mod:`wanpipe.models.vae` assembles them into the autoencoder).

- :class:`CausalCache`, what the causal layers of one encoder or decoder carry from chunk to chunk,
  and :class:`CausalConv3d`, the 3-D convolution that only looks at past frames.
- The blocks: :class:`RMSNorm`, :class:`ResidualBlock`, :class:`AttentionBlock`, :class:`Resample`
  (2x up/down sampling in space, and in time for the 3d modes), :class:`MidBlock`.
- Wan 2.2: :func:`patchify` / :func:`unpatchify` (pixel patches <-> channels) and the parameter-free
  shortcuts :class:`AvgDown3d` and :class:`DupUp3d`.
- The levels: :class:`ResidualDownBlock`, a Wan 2.2 encoder level (Wan 2.1's encoder is a flat list of
  blocks), and :class:`UpBlock`, a decoder level of either layout.

On the CPU in fp32 the 3x3x3 convolutions and the upsampling convolutions take the faster paths of
:mod:`wanpipe.models.fastconv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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

# ----------------------------------------------------------------------------------------------
# The causal cache and convolution
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


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


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
# Wan 2.2: patches and the parameter-free shortcuts
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


# ----------------------------------------------------------------------------------------------
# Levels: the encoder's (Wan 2.2) and the decoder's
# ----------------------------------------------------------------------------------------------


def _residual_blocks(in_dim: int, out_dim: int, count: int, dropout: float) -> nn.ModuleList:
    """``count`` residual blocks, the first from ``in_dim`` channels, all to ``out_dim``."""
    return nn.ModuleList(ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(count))


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


class UpBlock(nn.Module):
    """A decoder level: ``num_res_blocks + 1`` residual blocks, then an optional upsampler.

    Wan 2.1 layout: the upsampler halves the channels. Wan 2.2 (``residual``): it keeps them, and a level
    that upsamples adds a :class:`DupUp3d` shortcut of its input.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        dropout: float = 0.0,
        upsample_mode: ResampleMode | None = None,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.resnets = _residual_blocks(in_dim, out_dim, num_res_blocks + 1, dropout)
        self.upsampler: Resample | None = None
        self.shortcut: DupUp3d | None = None
        if upsample_mode is not None:
            self.upsampler = Resample(out_dim, upsample_mode, out_dim=out_dim if residual else None)
            if residual:
                self.shortcut = DupUp3d(in_dim, out_dim, 2 if upsample_mode == "upsample3d" else 1, 2)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """(B, in_dim, T, H, W) -> (B, C, T', 2H, 2W) with an upsampler, else (B, out_dim, T, H, W);
        C = out_dim, or out_dim // 2 in the Wan 2.1 layout."""
        inputs = x
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is None:
            return x
        x = self.upsampler(x, cache)
        return x if self.shortcut is None else x + self.shortcut(inputs, cache.first_chunk)
