"""A native UMT5 encoder (the text encoder of every Wan checkpoint), without importing transformers.

Same parameter names and numerics as transformers' ``UMT5EncoderModel`` (so checkpoints and the
key maps in ``weights/`` load unchanged): T5 RMS norms computed in float32, attention
without score scaling, a learned relative-position bias in every layer (bidirectional buckets), a
gated-GELU (tanh) feed-forward. Importing transformers' modeling code costs about 100 MB of host
memory for a few hundred lines of model, which is why this exists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# transformers' UMT5Config defaults, for the keys a config.json may leave out.
UMT5_DEFAULTS: dict[str, Any] = dict(
    vocab_size=250112,
    d_model=512,
    d_kv=64,
    d_ff=1024,
    num_layers=8,
    num_heads=6,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
)


@dataclass(frozen=True)
class UMT5Settings:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    feed_forward_proj: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UMT5Settings:
        merged = {**UMT5_DEFAULTS, **{k: v for k, v in d.items() if k in UMT5_DEFAULTS and v is not None}}
        settings = cls(**merged)
        act = settings.feed_forward_proj.removeprefix("gated-")
        if act not in ("gelu", "relu", "gelu_new"):
            raise ValueError(f"UMT5 feed_forward_proj {settings.feed_forward_proj!r} is not supported")
        return settings


def _embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding table left uninitialised (the loader assigns it): ``normal_`` on the meta device
    would import torch's Python meta registrations, about 70 MB of host memory."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class UMT5LayerNorm(nn.Module):
    """T5's RMS norm (no mean, no bias), in float32; the result is cast back to a low-precision weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 buckets: exact for small distances, logarithmic up to ``max_distance``."""
    num_buckets //= 2
    buckets = (relative_position > 0).to(torch.long) * num_buckets
    relative_position = relative_position.abs()
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    log_ratio = torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, large)


class UMT5Attention(nn.Module):
    def __init__(self, s: UMT5Settings) -> None:
        super().__init__()
        inner = s.num_heads * s.d_kv
        self.heads = s.num_heads
        self.num_buckets = s.relative_attention_num_buckets
        self.max_distance = s.relative_attention_max_distance
        self.q = nn.Linear(s.d_model, inner, bias=False)
        self.k = nn.Linear(s.d_model, inner, bias=False)
        self.v = nn.Linear(s.d_model, inner, bias=False)
        self.o = nn.Linear(inner, s.d_model, bias=False)
        self.relative_attention_bias = _embedding(self.num_buckets, self.heads)

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        """(1, H, L, L) in the bias table's dtype."""
        position = torch.arange(length, dtype=torch.long, device=device)
        buckets = relative_position_bucket(
            position[None, :] - position[:, None], self.num_buckets, self.max_distance
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        """x (B, L, d_model), mask_bias (B, 1, 1, L) additive -> (B, L, d_model)."""
        b, length, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(b, length, self.heads, -1).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = torch.matmul(q, k.transpose(3, 2))
        scores = scores + (self.position_bias(length, x.device).to(scores.dtype) + mask_bias.to(scores.dtype))
        weights = F.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, length, -1)
        return self.o(out)


class UMT5SelfAttentionLayer(nn.Module):
    def __init__(self, s: UMT5Settings) -> None:
        super().__init__()
        self.SelfAttention = UMT5Attention(s)
        self.layer_norm = UMT5LayerNorm(s.d_model, s.layer_norm_epsilon)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), mask_bias)


class UMT5DenseGatedActDense(nn.Module):
    def __init__(self, s: UMT5Settings) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(s.d_model, s.d_ff, bias=False)
        self.wi_1 = nn.Linear(s.d_model, s.d_ff, bias=False)
        self.wo = nn.Linear(s.d_ff, s.d_model, bias=False)
        act = s.feed_forward_proj.removeprefix("gated-")
        self.act = nn.ReLU() if act == "relu" else nn.GELU(approximate="tanh")

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        if h.dtype != self.wo.weight.dtype and self.wo.weight.dtype != torch.int8:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


class UMT5FeedForwardLayer(nn.Module):
    def __init__(self, s: UMT5Settings) -> None:
        super().__init__()
        self.DenseReluDense = UMT5DenseGatedActDense(s)
        self.layer_norm = UMT5LayerNorm(s.d_model, s.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(x: Tensor) -> Tensor:
    if x.dtype == torch.float16:
        top = torch.finfo(x.dtype).max
        limit = torch.where(torch.isinf(x).any(), top - 1000, top).to(x.dtype)
        x = torch.clamp(x, min=-limit, max=limit)
    return x


class UMT5Block(nn.Module):
    def __init__(self, s: UMT5Settings) -> None:
        super().__init__()
        self.layer = nn.ModuleList([UMT5SelfAttentionLayer(s), UMT5FeedForwardLayer(s)])

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        x = _clamp_fp16(self.layer[0](x, mask_bias))
        return _clamp_fp16(self.layer[1](x))


class UMT5Stack(nn.Module):
    def __init__(self, s: UMT5Settings) -> None:
        super().__init__()
        self.embed_tokens = _embedding(s.vocab_size, s.d_model)
        self.block = nn.ModuleList(UMT5Block(s) for _ in range(s.num_layers))
        self.final_layer_norm = UMT5LayerNorm(s.d_model, s.layer_norm_epsilon)


@dataclass
class EncoderOutput:
    last_hidden_state: Tensor


class UMT5Encoder(nn.Module):
    """``forward(input_ids (B, L), attention_mask (B, L)) -> EncoderOutput(last_hidden_state (B, L, d_model))``,
    as transformers' ``UMT5EncoderModel``; parameters ``shared``, ``encoder.embed_tokens`` (tied by the
    loader's aliases), ``encoder.block.N.layer.{0,1}...``, ``encoder.final_layer_norm``."""

    def __init__(self, settings: UMT5Settings) -> None:
        super().__init__()
        self.settings = settings
        self.shared = _embedding(settings.vocab_size, settings.d_model)
        self.encoder = UMT5Stack(settings)

    @classmethod
    def from_config_dict(cls, d: Mapping[str, Any]) -> UMT5Encoder:
        return cls(UMT5Settings.from_dict(d))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> EncoderOutput:
        x = self.encoder.embed_tokens(input_ids)
        dtype = x.dtype
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        for block in self.encoder.block:
            x = block(x, mask_bias)
        return EncoderOutput(self.encoder.final_layer_norm(x))
