"""The Wan2.2-Animate additions to the DiT: the motion encoder of the face video, the face encoder and
the face adapter blocks (Wan-Video/Wan2.2 ``wan/modules/animate/motion_encoder.py`` and
``face_blocks.py``; diffusers ``transformer_wan_animate.py``). :class:`~wanpipe.models.transformer.WanTransformerModel`
builds them when its config is an Animate one (``TransformerConfig.inject_face_latents_blocks``)::

    motion = face_encoder(motion_encoder(face frames))      # (B, F', heads + 1, dim) per latent frame
    hidden = hidden + face_block(hidden, motion)            # after main blocks 0, 5, 10, ... (run_blocks)

Parameter names are diffusers' (``motion_encoder.res_blocks.N.conv1.weight``, ``face_adapter.N.to_q.weight``):
the original's are ``nn.Sequential`` slots and a fused key/value projection, renamed and split at load
(``weights/animate_keys.py``).

Precision: the motion synthesis (a QR decomposition of ``motion_synthesis_weight``) runs in float32
(``keep_in_fp32``), the rest in the parameters' dtype, as in both references.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanpipe.models.transformer_layers import TransformerConfig

MOTION_ENCODER_CHANNELS: dict[int, int] = {
    4: 512,
    8: 512,
    16: 512,
    32: 512,
    64: 256,
    128: 128,
    256: 64,
    512: 32,
    1024: 16,
}
"""Channels of the motion encoder's feature maps by their size (the original ``EncoderApp``'s table)."""

BLUR_KERNEL = (1.0, 3.0, 3.0, 1.0)
"""The FIR filter applied before each downsampling convolution (StyleGAN2's, as in LIA)."""


class _ScaledLeakyReLU(nn.Module):
    """``leaky_relu(x + bias, 0.2) * sqrt(2)`` with a per-channel bias (the original ``FusedLeakyReLU``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, ...) -> (N, C, ...)."""
        bias = self.bias.view(1, -1, *([1] * (x.ndim - 2))).to(x.dtype)
        return F.leaky_relu(x + bias, 0.2) * math.sqrt(2.0)


class MotionConv2d(nn.Module):
    """An equalized-learning-rate conv (weight scaled by ``1/sqrt(fan_in)`` at run time), optionally after
    a blur (``downsample``: stride 2) and before a biased leaky ReLU (``activate``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        downsample: bool = False,
        activate: bool = True,
        bias: bool = True,
        padding: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.stride = 2 if downsample else 1
        self.padding = padding if padding is not None else 0 if downsample else kernel_size // 2
        self.blur_pad: tuple[int, int] | None = None
        if downsample:
            p = len(BLUR_KERNEL) - 2 + kernel_size - 1
            self.blur_pad = ((p + 1) // 2, p // 2)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias and not activate else None
        self.act_fn = _ScaledLeakyReLU(out_channels) if activate else None

    def _blur(self, x: Tensor) -> Tensor:
        assert self.blur_pad is not None
        k = torch.tensor(BLUR_KERNEL, dtype=torch.float32, device=x.device)
        kernel = torch.outer(k, k) / k.sum() ** 2  # symmetric: correlation = the original's convolution
        lo, hi = self.blur_pad
        x = F.pad(x, (lo, hi, lo, hi))
        weight = kernel.to(x.dtype)[None, None].expand(self.in_channels, 1, -1, -1)
        return F.conv2d(x, weight, groups=self.in_channels)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C_in, H, W) -> (N, C_out, H', W')."""
        if self.blur_pad is not None:
            x = self._blur(x)
        x = x.to(self.weight.dtype)
        x = F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)
        return x if self.act_fn is None else self.act_fn(x)


class MotionLinear(nn.Module):
    """An equalized-learning-rate linear layer (the original ``EqualLinear``, no activation)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.scale = 1.0 / math.sqrt(in_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, in_dim) -> (N, out_dim)."""
        return F.linear(x, self.weight * self.scale, self.bias)


class MotionResBlock(nn.Module):
    """conv 3x3, blurred stride-2 conv 3x3, and a blurred stride-2 1x1 skip, averaged by ``1/sqrt(2)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = MotionConv2d(in_channels, in_channels, 3)
        self.conv2 = MotionConv2d(in_channels, out_channels, 3, downsample=True)
        self.conv_skip = MotionConv2d(
            in_channels, out_channels, 1, downsample=True, activate=False, bias=False
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C_in, H, W) -> (N, C_out, H/2, W/2)."""
        return (self.conv2(self.conv1(x)) + self.conv_skip(x)) / math.sqrt(2.0)


class MotionEncoder(nn.Module):
    """Face frames -> motion vectors (LIA's appearance encoder and linear motion decomposition)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        size = cfg.motion_encoder_size
        assert size is not None and cfg.motion_style_dim is not None and cfg.motion_dim is not None
        assert cfg.motion_encoder_dim is not None
        channels = dict(cfg.motion_encoder_channel_sizes or MOTION_ENCODER_CHANNELS.items())
        self.size = size
        self.conv_in = MotionConv2d(3, channels[size], 1)
        blocks = []
        width = channels[size]
        for level in range(int(math.log2(size)), 2, -1):
            blocks.append(MotionResBlock(width, channels[2 ** (level - 1)]))
            width = channels[2 ** (level - 1)]
        self.res_blocks = nn.ModuleList(blocks)
        self.conv_out = MotionConv2d(width, cfg.motion_style_dim, 4, activate=False, bias=False, padding=0)
        style, motion = cfg.motion_style_dim, cfg.motion_dim
        self.motion_network = nn.ModuleList(
            [*(MotionLinear(style, style) for _ in range(4)), MotionLinear(style, motion)]
        )
        self.motion_synthesis_weight = nn.Parameter(torch.empty(cfg.motion_encoder_dim, motion))

    def forward(self, faces: Tensor) -> Tensor:
        """faces (N, 3, size, size) in [-1, 1] -> motion vectors (N, motion_encoder_dim) in the model dtype."""
        if tuple(faces.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"face_pixel_values must be {self.size}x{self.size} pixels (the motion encoder's size), "
                f"got {faces.shape[-1]}x{faces.shape[-2]}"
            )
        x = self.conv_in(faces)
        for res in self.res_blocks:
            x = res(x)
        feat = self.conv_out(x).flatten(1)  # (N, style_dim): the 4x4 conv leaves 1x1
        for linear in self.motion_network:
            feat = linear(feat)
        # Linear motion decomposition: the magnitudes along an orthonormal basis of directions (fp32 QR).
        q = torch.linalg.qr(self.motion_synthesis_weight.float() + 1e-8)[0]
        return (feat.float() @ q.T).to(feat.dtype)


class FaceEncoder(nn.Module):
    """Motion vectors per face frame -> ``heads + 1`` tokens per latent frame: causal temporal convs
    (the 4x temporal downsampling of the VAE), one learned padding token appended."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        hidden, heads = cfg.face_encoder_hidden_dim, cfg.face_encoder_num_heads
        assert hidden is not None and heads is not None and cfg.motion_encoder_dim is not None
        self.num_heads = heads
        self.conv1_local = nn.Conv1d(cfg.motion_encoder_dim, hidden * heads, 3)
        self.conv2 = nn.Conv1d(hidden, hidden, 3, stride=2)
        self.conv3 = nn.Conv1d(hidden, hidden, 3, stride=2)
        self.norm1 = nn.LayerNorm(hidden, 1e-6, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(hidden, 1e-6, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(hidden, 1e-6, elementwise_affine=False)
        self.out_proj = nn.Linear(hidden, cfg.dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, cfg.dim))

    @staticmethod
    def _causal(conv: nn.Conv1d, x: Tensor) -> Tensor:
        """(N, C, T) -> conv over time, left-padded by repeating the first frame (N, C', T')."""
        return conv(F.pad(x, (conv.kernel_size[0] - 1, 0), mode="replicate"))

    def forward(self, motion: Tensor) -> Tensor:
        """motion (B, T, motion_encoder_dim) -> (B, T', heads + 1, dim), T' = ceil(ceil(T / 2) / 2)."""
        batch = motion.shape[0]
        x = self._causal(self.conv1_local, motion.transpose(1, 2))  # (B, heads * hidden, T)
        x = x.unflatten(1, (self.num_heads, -1)).flatten(0, 1).transpose(1, 2)  # (B * heads, T, hidden)
        x = F.silu(self.norm1(x))
        x = F.silu(self.norm2(self._causal(self.conv2, x.transpose(1, 2)).transpose(1, 2)))
        x = F.silu(self.norm3(self._causal(self.conv3, x.transpose(1, 2)).transpose(1, 2)))
        x = self.out_proj(x).unflatten(0, (batch, self.num_heads)).transpose(1, 2)  # (B, T', heads, dim)
        padding = self.padding_tokens.to(x.dtype).expand(batch, x.shape[1], 1, -1)
        return torch.cat([x, padding], dim=2)


class FaceBlock(nn.Module):
    """A face adapter block: each latent frame's tokens attend to that frame's motion tokens; the output
    is added to the main stream (the original ``FaceBlock``; diffusers ``WanAnimateFaceBlockCrossAttention``)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        dim, head_dim = cfg.dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.pre_norm_q = nn.LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.pre_norm_kv = nn.LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(head_dim, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=cfg.eps)

    def forward(self, hidden: Tensor, motion: Tensor) -> Tensor:
        """hidden (B, L, dim) with L = F * h * w tokens in frame-major order, motion (B, F, N, dim) ->
        hidden + the adapter's output, (B, L, dim)."""
        batch, frames, n, _ = motion.shape
        if hidden.shape[1] % frames:
            raise ValueError(f"{hidden.shape[1]} tokens do not split into {frames} latent frames")
        kv = self.pre_norm_kv(motion).flatten(1, 2)  # (B, F * N, dim)
        q = self.norm_q(self.to_q(self.pre_norm_q(hidden)).unflatten(-1, (self.heads, -1)))
        k = self.norm_k(self.to_k(kv).unflatten(-1, (self.heads, -1)))
        v = self.to_v(kv).unflatten(-1, (self.heads, -1)).to(q.dtype)
        # One attention per latent frame: (B * F, heads, tokens of the frame | N motion tokens, head_dim).
        q = q.unflatten(1, (frames, -1)).flatten(0, 1).transpose(1, 2)
        k = k.to(q.dtype).unflatten(1, (frames, n)).flatten(0, 1).transpose(1, 2)
        v = v.unflatten(1, (frames, n)).flatten(0, 1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B * F, L / F, dim)
        return hidden + self.to_out(out.unflatten(0, (batch, frames)).flatten(1, 2))
