"""TAEHV: the tiny video autoencoder for Wan latents (``taew2_1``, ``taew2_2``), decoder and encoder.

A native implementation of madebyollin's TAEHV (https://github.com/madebyollin/taehv, ``taehv.py``,
MIT license), written from reading it; the parameter names are the published checkpoints' own (the
encoder and decoder are flat sequences, ``decoder.{i}.conv.{j}.weight``), so ``taew2_1.pth`` and
``taew2_2.pth`` (or their ``.safetensors``) load without renames (:mod:`wanpipe.weights.taehv`).

Each latent frame goes through 2-D convolutions; time enters only through

- ``MemBlock``: a residual block that also sees its own input at the previous (latent or pixel) frame
  (zeros before the first one) - a causal memory of one frame per block;
- ``TGrow``: a 1x1 convolution that makes ``stride`` frames out of one (temporal upsampling);
- ``TPool``: a 1x1 convolution that folds ``stride`` frames into one (temporal downsampling).

Latent space: TAEHV takes the latents exactly as the diffusion model produces them - the
*normalized* latents our DiT denoises and :func:`wanpipe.stages.decode.decode` receives (our full
decode denormalizes them with the VAE's ``latents_mean``/``latents_std`` first; TAEHV must not).
The reference README, "How do I use TAEHV with Diffusers?" point 3: "TAEHV does not use any latent
scales / shifts (TAEHV encodes / decodes exactly what diffusion models use), whereas Diffusers requires
explicitly applying a ``latents_mean`` and ``latents_std``".

Frames: ``f`` latent frames decode to ``4 f`` frames of which the first ``3`` (the startup frames of
the causal temporal upsampling, ``frames_to_trim``) are dropped: ``4 (f - 1) + 1``, as many as the
full Wan VAE returns. Values are in [0, 1] (the reference clamps), as the decode stage returns them.

- ``taew2_1``: 16 latent channels, RGB in and out (Wan 2.1, Wan 2.2 A14B).
- ``taew2_2``: 48 latent channels, 2x2 pixel patches folded into channels (Wan 2.2 TI2V-5B).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TAEHVConfig:
    """The shape of a TAEHV checkpoint (see :func:`wanpipe.weights.taehv.config_from_state_dict`).

    ``decoder_time_upscale`` / ``decoder_space_upscale``: per decoder stage, whether it doubles time /
    height and width; turning them off gives a cheaper, shorter or smaller preview from the same weights.
    """

    latent_channels: int = 16
    patch_size: int = 1
    image_channels: int = 3
    encoder_width: int = 64
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)
    decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True)
    blocks_per_stage: int = 3

    def __post_init__(self) -> None:
        for name in (
            "decoder_widths",
            "encoder_time_downscale",
            "decoder_time_upscale",
            "decoder_space_upscale",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.decoder_widths) != 4:
            raise ValueError(f"TAEHVConfig.decoder_widths must have 4 entries, got {self.decoder_widths}")
        for name in ("encoder_time_downscale", "decoder_time_upscale", "decoder_space_upscale"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"TAEHVConfig.{name} must have 3 entries (one per stage)")
        if self.latent_channels < 1 or self.patch_size < 1 or self.blocks_per_stage < 1:
            raise ValueError("TAEHVConfig: latent_channels, patch_size and blocks_per_stage must be >= 1")

    @classmethod
    def taew2_1(cls) -> TAEHVConfig:
        """Wan 2.1's 16-channel latents (also Wan 2.2 A14B)."""
        return cls()

    @classmethod
    def taew2_2(cls) -> TAEHVConfig:
        """Wan 2.2 TI2V-5B's 48-channel latents, 2x2 patches."""
        return cls(latent_channels=48, patch_size=2)

    def with_upscale(
        self,
        time: tuple[bool, bool, bool] | None = None,
        space: tuple[bool, bool, bool] | None = None,
    ) -> TAEHVConfig:
        """The same checkpoint decoding with other temporal / spatial upscaling (cheaper previews)."""
        return replace(
            self,
            decoder_time_upscale=self.decoder_time_upscale if time is None else tuple(time),
            decoder_space_upscale=self.decoder_space_upscale if space is None else tuple(space),
        )

    @property
    def time_upscale(self) -> int:
        """Pixel frames per latent frame before the trim."""
        return 2 ** sum(self.decoder_time_upscale)

    @property
    def time_downscale(self) -> int:
        return 2 ** sum(self.encoder_time_downscale)

    @property
    def frames_to_trim(self) -> int:
        """The decoder's first output frames that are dropped (causal startup)."""
        return self.time_upscale - 1

    @property
    def spatial_upscale(self) -> int:
        return 2 ** sum(self.decoder_space_upscale) * self.patch_size

    def num_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from ``latent_frames``: ``time_upscale * f - frames_to_trim``."""
        return self.time_upscale * latent_frames - self.frames_to_trim


def _conv3(n_in: int, n_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """A soft clamp of the latents to (-3, 3): ``3 tanh(x / 3)``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """A residual block over one frame and its own input at the previous frame ``past``.

    ``(N, n_in, H, W), (N, n_in, H, W) -> (N, n_out, H, W)``.
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3(2 * n_in, n_out), nn.ReLU(), _conv3(n_out, n_out), nn.ReLU(), _conv3(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """``stride`` consecutive frames -> one: ``(N T, C, H, W) -> (N T / stride, C, H, W)``."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        return self.conv(x.reshape(-1, self.stride * c, h, w))


class TGrow(nn.Module):
    """One frame -> ``stride`` consecutive frames: ``(N T, C, H, W) -> (N T stride, C, H, W)``."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


def _build_encoder(cfg: TAEHVConfig) -> nn.Sequential:
    n = cfg.encoder_width
    layers: list[nn.Module] = [_conv3(cfg.image_channels * cfg.patch_size**2, n), nn.ReLU()]
    for down in cfg.encoder_time_downscale:
        layers += [TPool(n, 2 if down else 1), _conv3(n, n, stride=2, bias=False)]
        layers += [MemBlock(n, n) for _ in range(cfg.blocks_per_stage)]
    layers.append(_conv3(n, cfg.latent_channels))
    return nn.Sequential(*layers)


def _build_decoder(cfg: TAEHVConfig) -> nn.Sequential:
    n = cfg.decoder_widths
    layers: list[nn.Module] = [Clamp(), _conv3(cfg.latent_channels, n[0]), nn.ReLU()]
    for stage, (time_up, space_up) in enumerate(zip(cfg.decoder_time_upscale, cfg.decoder_space_upscale)):
        layers += [MemBlock(n[stage], n[stage]) for _ in range(cfg.blocks_per_stage)]
        layers += [
            nn.Upsample(scale_factor=2 if space_up else 1),
            TGrow(n[stage], 2 if time_up else 1),
            _conv3(n[stage], n[stage + 1], bias=False),
        ]
    layers += [nn.ReLU(), _conv3(n[3], cfg.image_channels * cfg.patch_size**2)]
    return nn.Sequential(*layers)


def run_frames(
    layers: nn.Sequential, x: Tensor, batch: int, memory: list[Tensor | None] | None = None
) -> Tensor:
    """Consecutive frames at once: ``(B T, C, H, W)`` (batch-major) -> ``(B T', C', H', W')``.

    Each MemBlock's ``past`` is its input one frame earlier: zeros before the first frame, or with
    ``memory`` (one entry per layer, updated in place) the last input frame of the previous call, so that
    a video decoded in pieces gives the frames it gives whole.
    """
    for index, layer in enumerate(layers):
        if isinstance(layer, MemBlock):
            nt, c, h, w = x.shape
            frames = x.view(batch, nt // batch, c, h, w)
            before = None if memory is None else memory[index]
            if before is None:
                past = F.pad(frames, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]
            else:
                past = torch.cat([before.unsqueeze(1), frames[:, :-1]], dim=1)
            if memory is not None:
                memory[index] = frames[:, -1].clone()  # (B, C, H, W), not a view keeping ``x`` alive
            x = layer(x, past.reshape(nt, c, h, w))
        else:
            x = layer(x)
    return x


class TAEHV(nn.Module):
    """The tiny autoencoder: ``encoder`` and ``decoder`` sequences, run over all frames at once
    (:meth:`decode_video`) or frame by frame (:meth:`stream` / :class:`TAEHVStream`)."""

    def __init__(self, config: TAEHVConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _build_encoder(config)
        self.decoder = _build_decoder(config)

    def _check(self, x: Tensor, channels: int, what: str) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, T, H, W), got {tuple(x.shape)}")

    def _to_frames(self, x: Tensor) -> tuple[Tensor, int]:
        """(B, C, T, H, W) -> (B T, C, H, W), B."""
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), b

    def _postprocess(self, x: Tensor) -> Tensor:
        """Decoder output frames (N, 3 p^2, h, w) -> RGB (N, 3, p h, p w) in [0, 1]."""
        if self.config.patch_size > 1:
            x = F.pixel_shuffle(x, self.config.patch_size)
        return x.clamp(0, 1)

    def decode_video(self, latents: Tensor, *, chunk_frames: int | None = None) -> Tensor:
        """Normalized latents (B, C, f, h, w) -> frames (B, 3, 4(f - 1) + 1, s h, s w) in [0, 1].

        ``s = 8 patch_size`` (with every spatial upscale on); the frame count follows
        :meth:`TAEHVConfig.num_frames`. ``chunk_frames``: latent frames decoded at a time (through
        :meth:`stream`; 1: frame by frame, the reference's ``parallel=False``): the same frames, memory
        bounded by the chunk; None: all at once (the reference's ``parallel=True``).
        """
        self._check(latents, self.config.latent_channels, "latents")
        f = latents.shape[2]
        step = f if chunk_frames is None else chunk_frames
        if step < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        stream = self.stream()
        pieces = [stream.push(latents[:, :, i : i + step]) for i in range(0, f, step)]
        return torch.cat([p for p in pieces if p is not None], dim=2)

    def encode_video(self, video: Tensor) -> Tensor:
        """Frames (B, 3, F, H, W) in [0, 1] -> normalized latents (B, C, ceil(F / 4), H / s, W / s).

        The last frame is repeated to a multiple of the temporal downscale (4), as the reference does;
        ``4k + 1`` frames give ``k + 1`` latent frames, as the full VAE's encode.
        """
        self._check(video, self.config.image_channels, "video")
        pad = -video.shape[2] % self.config.time_downscale
        if pad:
            video = torch.cat([video, video[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        x, b = self._to_frames(video)
        if self.config.patch_size > 1:
            x = F.pixel_unshuffle(x, self.config.patch_size)
        x = run_frames(self.encoder, x, b)
        n, c, h, w = x.shape
        return x.view(b, n // b, c, h, w).permute(0, 2, 1, 3, 4)

    def stream(self) -> TAEHVStream:
        """A frame-by-frame decoder over this model (:class:`TAEHVStream`)."""
        return TAEHVStream(self)


class TAEHVStream:
    """Decodes latents as they come, a piece of latent frames at a time, keeping only each MemBlock's
    input at the last frame (``memory``): the same frames as :meth:`TAEHV.decode_video` of the whole,
    the first ``frames_to_trim`` (startup) frames dropped.

    ``push(latents (B, C, t, h, w)) -> frames (B, 3, n, H, W)``, or None while only startup frames came
    out; one latent frame gives its first frame at once (``n = 1``), each one after gives 4.
    """

    def __init__(self, model: TAEHV) -> None:
        self.model = model
        self.memory: list[Tensor | None] = [None] * len(model.decoder)
        self.to_trim = model.config.frames_to_trim

    def push(self, latents: Tensor) -> Tensor | None:
        """New latent frames (B, C, t, h, w) -> the frames they complete (B, 3, n, H, W), or None."""
        self.model._check(latents, self.model.config.latent_channels, "latents")
        x, b = self.model._to_frames(latents)
        x = self.model._postprocess(run_frames(self.model.decoder, x, b, self.memory))
        n, c, h, w = x.shape
        video = x.view(b, n // b, c, h, w)
        drop = min(self.to_trim, video.shape[1])
        self.to_trim -= drop
        video = video[:, drop:]
        return video.permute(0, 2, 1, 3, 4) if video.shape[1] else None


__all__ = ["TAEHV", "TAEHVConfig", "TAEHVStream"]
