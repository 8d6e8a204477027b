"""The Wan DiT's building blocks: its config, the functional pieces (timestep sinusoid, 3-D RoPE,
attention, text padding compression), the fp32 norms, the attention layers, the block, the head and
the image projection. :mod:`wanpipe.models.transformer` assembles them into the model.

Zero-padded text (Wan's text encoder zeroes every row past a prompt's length) can be compressed once
per request with :func:`compress_text_padding`: the n identical padding rows become one row whose
attention logit gets ``+log(n)``, the same softmax over (prompt length + 1) keys instead of 512::

    text, bias = compress_text_padding(text_embeds)
    x = model.embed(latents, timestep, text, image_embeds, text_bias=bias)

Precision islands (the rest runs in the parameters' dtype):

* time embedding MLP, sinusoid and its output ``temb``: float32 (``keep_in_fp32``);
* modulation: the ``time_projection`` output is promoted to float32 and added to the float32
  ``modulation`` tables; the modulated LayerNorms and the gated residual adds are float32;
* every LayerNorm is computed in float32 (the affine ones keep float32 weights);
* RoPE angles are computed in float64 and stored as float32 cos/sin tables; rotation in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Rope = tuple[Tensor, Tensor]
"""``(cos, sin)``, each (L, head_dim // 2) float32: one angle per rotated channel pair."""

ROPE_THETA = 10000.0
TIME_MAX_PERIOD = 10000.0


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

ANIMATE_DEFAULTS: dict[str, int] = {
    "motion_encoder_size": 512,
    "motion_style_dim": 512,
    "motion_dim": 20,
    "motion_encoder_dim": 512,
    "face_encoder_hidden_dim": 1024,
    "face_encoder_num_heads": 4,
    "inject_face_latents_blocks": 5,
    "motion_encoder_batch_size": 8,
}
"""The Animate fields' values in the released Wan2.2-Animate-14B (diffusers' ``WanAnimateTransformer3DModel``
defaults; the original ``WanAnimateModel`` hard-codes the same: ``Generator(size=512, style_dim=512,
motion_dim=20)``, ``FaceEncoder(num_heads=4)`` of width 1024, a face block every 5 blocks, encode batch 8)."""

ANIMATE_FIELDS: tuple[str, ...] = ("latent_channels", "motion_encoder_channel_sizes", *ANIMATE_DEFAULTS)
"""The :class:`TransformerConfig` fields of an Animate DiT (all None for other models)."""


@dataclass(frozen=True)
class TransformerConfig:
    """The DiT hyper-parameters: the keys of a diffusers ``transformer/config.json``."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    vace_layers: tuple[int, ...] | None = None
    """VACE: the main blocks after which each VACE block's hint is added (ascending, 0 first); None:
    a plain DiT."""
    vace_in_channels: int | None = None
    """VACE: channels of the control latents (96 in the released models); None: a plain DiT."""
    # Wan2.2-Animate (diffusers' ``WanAnimateTransformer3DModel`` keys; all None: not an Animate DiT; set
    # one and the others take diffusers' defaults, those of the released model).
    latent_channels: int | None = None
    """Animate: channels of the pose latents (``pose_patch_embedding``); default (in_channels - 4) / 2."""
    motion_encoder_channel_sizes: tuple[tuple[int, int], ...] | None = None
    """Animate: the motion encoder's channels per feature-map size, as (size, channels) pairs (a
    ``{"size": channels}`` mapping is accepted); None: the original table (``models.animate``)."""
    motion_encoder_size: int | None = None
    """Animate: face frames are motion_encoder_size x motion_encoder_size pixels (512)."""
    motion_style_dim: int | None = None
    """Animate: the motion encoder's appearance feature width (512)."""
    motion_dim: int | None = None
    """Animate: how many motion directions (20)."""
    motion_encoder_dim: int | None = None
    """Animate: the motion vector's width (512)."""
    face_encoder_hidden_dim: int | None = None
    """Animate: the face encoder's width per head (1024)."""
    face_encoder_num_heads: int | None = None
    """Animate: motion tokens per latent frame, before the padding token (4)."""
    inject_face_latents_blocks: int | None = None
    """Animate: a face adapter block runs after main blocks 0, n, 2n, ... (n = 5); None: not Animate."""
    motion_encoder_batch_size: int | None = None
    """Animate: face frames per motion-encoder call by default (8): memory only, not numerics."""

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> TransformerConfig:
        """Build from a parsed config.json; ``_``-prefixed and unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if not k.startswith("_") and k in known}
        return cls(**kwargs)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        patch = tuple(self.patch_size)
        if len(patch) != 3 or any(not isinstance(p, int) or p < 1 for p in patch):
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size!r}")
        object.__setattr__(self, "patch_size", patch)
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        for name in ("num_attention_heads", "in_channels", "out_channels", "text_dim", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")
        head_dim = self.attention_head_dim
        if head_dim < 6 or head_dim % 2:
            raise ValueError(
                "attention_head_dim must be even and >= 6 so that 3-D RoPE can split it into "
                f"frame/height/width parts of even size, got {head_dim}"
            )
        if self.freq_dim < 2 or self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even and positive, got {self.freq_dim}")
        if self.qk_norm not in ("rms_norm_across_heads", None):
            raise ValueError(f"qk_norm must be 'rms_norm_across_heads' or None, got {self.qk_norm!r}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.rope_max_seq_len < 1:
            raise ValueError(f"rope_max_seq_len must be positive, got {self.rope_max_seq_len}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                "image_dim and added_kv_proj_dim come together (image-to-video models set both), "
                f"got image_dim={self.image_dim}, added_kv_proj_dim={self.added_kv_proj_dim}"
            )
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.dim:
            raise ValueError(
                f"added_kv_proj_dim must equal the model dim {self.dim} (the image keys/values are "
                f"projected from the embedded image tokens), got {self.added_kv_proj_dim}"
            )
        if self.pos_embed_seq_len is not None and (self.image_dim is None or self.pos_embed_seq_len < 1):
            raise ValueError("pos_embed_seq_len needs image_dim and must be positive")
        self._check_vace()
        self._check_animate()

    def _check_vace(self) -> None:
        if (self.vace_layers is None) != (self.vace_in_channels is None):
            raise ValueError(
                "vace_layers and vace_in_channels come together (VACE models set both), "
                f"got vace_layers={self.vace_layers}, vace_in_channels={self.vace_in_channels}"
            )
        if self.vace_layers is None or self.vace_in_channels is None:
            return
        layers = tuple(self.vace_layers)
        if (
            not layers
            or not all(isinstance(i, int) and 0 <= i < self.num_layers for i in layers)
            or list(layers) != sorted(set(layers))
            or layers[0] != 0
        ):
            raise ValueError(
                f"vace_layers must be distinct block indices in ascending order from 0, each below "
                f"num_layers={self.num_layers}, got {self.vace_layers!r}"
            )
        object.__setattr__(self, "vace_layers", layers)
        if self.vace_in_channels < 1:
            raise ValueError(f"vace_in_channels must be positive, got {self.vace_in_channels}")

    def _check_animate(self) -> None:
        if all(getattr(self, n) is None for n in ANIMATE_FIELDS):
            return
        for name, default in ANIMATE_DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.latent_channels is None:
            object.__setattr__(self, "latent_channels", (self.in_channels - 4) // 2)
        if self.in_channels != 2 * self.latent_channels + 4:
            raise ValueError(
                "an Animate DiT takes the noise, the reference/previous-segment latents and their 4 mask "
                f"channels: in_channels must be 2 * latent_channels + 4, got in_channels={self.in_channels}, "
                f"latent_channels={self.latent_channels}"
            )
        if self.vace_layers is not None:
            raise ValueError("a DiT is either a VACE or an Animate model, not both")
        if self.patch_size[0] != 1:
            raise ValueError(f"an Animate DiT needs a temporal patch size of 1, got {self.patch_size}")
        if self.num_layers % self.inject_face_latents_blocks:  # type: ignore[operator]
            raise ValueError(
                f"num_layers ({self.num_layers}) must be a multiple of inject_face_latents_blocks "
                f"({self.inject_face_latents_blocks}): a face adapter block follows blocks 0, n, 2n, ..."
            )
        sizes = self.motion_encoder_channel_sizes
        if sizes is not None:
            items = sizes.items() if isinstance(sizes, Mapping) else sizes
            table = tuple(sorted((int(k), int(v)) for k, v in items))
            object.__setattr__(self, "motion_encoder_channel_sizes", table)
        size = self.motion_encoder_size
        assert size is not None and self.inject_face_latents_blocks is not None
        if size < 8 or size & (size - 1):
            raise ValueError(f"motion_encoder_size must be a power of two >= 8, got {size}")
        needed = {2**i for i in range(2, int(math.log2(size)) + 1)}
        if self.motion_encoder_channel_sizes is not None:
            missing = sorted(needed - {k for k, _ in self.motion_encoder_channel_sizes})
            if missing:
                raise ValueError(f"motion_encoder_channel_sizes has no channels for sizes {missing}")
        for name in [*ANIMATE_DEFAULTS, "latent_channels"]:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def is_animate(self) -> bool:
        """A Wan2.2-Animate DiT (pose patch embedding, motion and face encoders, face adapter)."""
        return self.inject_face_latents_blocks is not None

    @property
    def num_face_blocks(self) -> int:
        """Animate: how many face adapter blocks (one per ``inject_face_latents_blocks`` main blocks)."""
        n = self.inject_face_latents_blocks
        return 0 if n is None else self.num_layers // n

    @property
    def dim(self) -> int:
        """Model width: heads * head_dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_vace_layers(self) -> int:
        """How many VACE blocks (and hints) the model has: 0 for a plain DiT."""
        return 0 if self.vace_layers is None else len(self.vace_layers)

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Channels of each head rotated by the frame, height and width positions."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw


# --------------------------------------------------------------------------------------------
# Functional pieces
# --------------------------------------------------------------------------------------------


def timestep_sinusoid(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal timestep features, float32: (...,) -> (..., dim) laid out as [cos | sin]."""
    half = dim // 2
    exponent = -math.log(TIME_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rope_angles(positions: int, dim: int, theta: float = ROPE_THETA) -> Tensor:
    """float64 rotation angles for ``positions`` positions: (positions, dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) in float32.

    x: (B, L, H, D) (heads not yet moved in front of the tokens); rope: cos, sin (L, D/2)
    -> (B, L, H, D) in x's dtype.
    """
    cos, sin = rope
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (L, 1, D/2): the same rotation for every head
    pairs = x.float().contiguous().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        # Real arithmetic, which the compiler fuses into one kernel (it does not generate complex code).
        x1, x2 = pairs.unbind(-1)
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)
    # Eager: one complex multiply (x1 + i x2)(cos + i sin) instead of four real products, a sum, a
    # difference and a stack: the same arithmetic, far fewer passes over q and k.
    rotated = torch.view_as_complex(pairs) * torch.complex(cos, sin)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """Multi-head attention: q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, Lq, H*D).

    ``bias``: an additive logit bias broadcastable to (B, H, Lq, Lk), e.g. (B, 1, 1, Lk), or None."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)


def compress_text_padding(text_embeds: Tensor, multiple_of: int = 1) -> tuple[Tensor, Tensor | None]:
    """Drop all but one of each row's trailing all-zero text rows; the kept one stands for them all.

    text_embeds (B, Lt, D) -> (text (B, Lk, D), bias (B, Lk) float32), or ``(text_embeds, None)`` when
    that would keep all Lt rows. The n trailing zero rows of a sample embed to n identical keys and
    values, and attention over n copies of a key equals attention over one copy with ``log(n)`` added
    to its logit. So a sample with ``m`` rows up to its last nonzero one keeps them (bias 0), one zero
    row with bias ``log(Lt - m)`` when ``m < Lt``, and -inf on the slots up to Lk (the longest sample's
    ``m + 1``, rounded up to ``multiple_of``, which attention kernels may want aligned): the text
    attention with ``bias`` is the attention over the full ``text_embeds`` (float rounding aside).

    Reads the lengths back to the host once: call it once per request, not per step.
    """
    batch, length = text_embeds.shape[:2]
    positions = torch.arange(1, length + 1, device=text_embeds.device)
    kept = (text_embeds.ne(0).any(-1) * positions).amax(-1) if length else positions.new_zeros(batch)
    lengths = [int(n) for n in kept.tolist()]  # the one device-to-host read
    slots = max((n + (n < length) for n in lengths), default=0)
    slots = -(-slots // multiple_of) * multiple_of
    if slots >= length:
        return text_embeds, None
    n = torch.tensor(lengths, dtype=torch.float64)[:, None]
    slot = torch.arange(slots, dtype=torch.float64)
    pad_bias = torch.log(length - n).expand(batch, slots)
    bias = torch.where(slot < n, 0.0, torch.where(slot == n, pad_bias, float("-inf"))).float()
    # Rows past each sample's length are zeros already: the slice holds the pad row and unused slots.
    return text_embeds[:, :slots], bias.to(text_embeds.device)


AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""An attention function like :func:`attention`: q, k, v (B, H, L, D) -> (B, Lq, H*D)."""


_GELU_C = 2.0 * math.sqrt(2.0 / math.pi)


class TanhGELU(nn.GELU):
    """``nn.GELU(approximate="tanh")``, (...) -> (...). On the CPU as ``x * sigmoid(2z)`` with
    ``z = sqrt(2/pi) (x + 0.044715 x^3)`` (the same function: 0.5 (1 + tanh z) = sigmoid(2z)): PyTorch's
    CPU tanh-GELU kernel runs on one thread, and this is ~2x faster on two. Elsewhere the fused kernel."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
            return super().forward(x)
        z = x * x
        z.mul_(0.044715 * _GELU_C).add_(_GELU_C).mul_(x)
        return z.sigmoid_().mul_(x)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype: (..., C) -> (..., C), input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


def _qk_norm(dim: int, cfg: TransformerConfig) -> nn.Module:
    # RMSNorm across all heads at once (the projection output before the head split).
    return nn.RMSNorm(dim, eps=cfg.eps) if cfg.qk_norm is not None else nn.Identity()


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class _Projections(nn.Module):
    """The q/k/v/o projections and q/k norms both attention layers have (the reference's names)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.heads = cfg.num_attention_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = _qk_norm(dim, cfg)
        self.norm_k = _qk_norm(dim, cfg)


class SelfAttention(_Projections):
    """Self-attention with RMS-normed q/k and 3-D RoPE."""

    def forward(self, x: Tensor, rope: Rope, attention_fn: AttentionFn = attention) -> Tensor:
        """x (B, L, dim), rope cos/sin (L, head_dim/2) -> (B, L, dim).

        ``attention_fn`` (q, k, v (B, H, L, D) -> (B, L, H*D)) computes the attention itself: plain SDPA
        by default; ``wanpipe.parallel`` passes a sequence-parallel one when ``x`` is a token shard."""
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, (self.heads, -1)), rope).transpose(1, 2)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, (self.heads, -1)), rope).transpose(1, 2)
        v = _split_heads(self.v(x), self.heads)
        return self.o(attention_fn(q, k, v))


class CrossAttention(_Projections):
    """Cross-attention to the text tokens, plus a separate image-token branch for I2V models."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        dim = cfg.dim
        self.has_image = cfg.added_kv_proj_dim is not None
        if self.has_image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = _qk_norm(dim, cfg)

    def forward(
        self, x: Tensor, context: Tensor, num_image_tokens: int = 0, text_bias: Tensor | None = None
    ) -> Tensor:
        """x (B, L, dim), context (B, Li + Lt, dim) with the Li image tokens first -> (B, L, dim).

        ``text_bias`` (B, 1, 1, Lt) in the attention dtype, or None: added to the text attention's
        logits (see :func:`compress_text_padding`); the image branch takes none."""
        if self.has_image and num_image_tokens <= 0:
            raise ValueError("this image-to-video block needs image tokens in its context")
        if not self.has_image and num_image_tokens:
            raise ValueError("this block has no image branch but got image tokens")
        image, text = context[:, :num_image_tokens], context[:, num_image_tokens:]
        q = _split_heads(self.norm_q(self.q(x)), self.heads)
        k = _split_heads(self.norm_k(self.k(text)), self.heads)
        v = _split_heads(self.v(text), self.heads)
        out = attention(q, k, v, text_bias)
        if self.has_image:
            k_img = _split_heads(self.norm_k_img(self.k_img(image)), self.heads)
            v_img = _split_heads(self.v_img(image), self.heads)
            out = out + attention(q, k_img, v_img)
        return self.o(out)


def _modulation_table(rows: int, dim: int) -> nn.Parameter:
    """A learned (1, rows, dim) modulation table, N(0, 1/dim) at init. On the meta device it is left
    empty: arithmetic on meta tensors imports torch's Python decompositions (about 70 MB of host memory)."""
    table = torch.empty(1, rows, dim)
    if not table.is_meta:
        table.normal_(0.0, dim**-0.5)
    return nn.Parameter(table)


def _modulation_rows(table: Tensor, modulation: Tensor) -> tuple[Tensor, ...]:
    """float32 table (1, n, dim) + modulation (B, n, dim) or (B, L, n, dim) -> n x (B, 1|L, dim)."""
    if modulation.ndim == 3:
        modulation = modulation.unsqueeze(1)
    return (table.float() + modulation.float()).unbind(2)


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated tanh-GELU FFN."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = Fp32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = Fp32LayerNorm(dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = Fp32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), TanhGELU(), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = _modulation_table(6, dim)

    def forward(
        self,
        hidden: Tensor,
        context: Tensor,
        modulation: Tensor,
        rope: Rope,
        num_image_tokens: int = 0,
        self_attention: AttentionFn = attention,
        context_bias: Tensor | None = None,
    ) -> Tensor:
        """Run the block.

        hidden (B, L, dim); context (B, Li + Lt, dim), image tokens first, ``num_image_tokens`` = Li;
        modulation (B, 6, dim) or per-token (B, L, 6, dim), float32; rope cos/sin (L, head_dim/2)
        -> hidden (B, L, dim) in hidden's dtype. ``self_attention``: the self-attention's attention
        function (see :meth:`SelfAttention.forward`); cross-attention always uses :func:`attention`.
        ``context_bias`` (B, 1, 1, Lt) or None: the text attention's logit bias
        (:attr:`DiTInputs.context_bias`).
        """
        shift, scale, gate, c_shift, c_scale, c_gate = _modulation_rows(self.modulation, modulation)
        dtype = hidden.dtype

        # addcmul: the modulated norms and gated residuals as one pass each (shift + x * (1 + scale)).
        x = torch.addcmul(shift, self.norm1(hidden.float()), 1 + scale).to(dtype)
        hidden = torch.addcmul(hidden.float(), self.self_attn(x, rope, self_attention), gate).to(dtype)

        hidden = hidden + self.cross_attn(self.norm3(hidden), context, num_image_tokens, context_bias)

        x = torch.addcmul(c_shift, self.norm2(hidden.float()), 1 + c_scale).to(dtype)
        return torch.addcmul(hidden.float(), self.ffn(x), c_gate).to(dtype)


class VaceBlock(WanBlock):
    """A VACE context block (Wan2.1 ``vace_model.py``): a DiT block over the control tokens whose output,
    projected by ``after_proj``, is the hint added to the main stream after the main block at its layer.
    The first one (``first``) starts the control stream: ``before_proj(control) + hidden``."""

    def __init__(self, cfg: TransformerConfig, first: bool) -> None:
        super().__init__(cfg)
        self.before_proj = nn.Linear(cfg.dim, cfg.dim) if first else None
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(  # type: ignore[override]
        self,
        hidden: Tensor,
        context: Tensor,
        modulation: Tensor,
        rope: Rope,
        num_image_tokens: int = 0,
        self_attention: AttentionFn = attention,
        context_bias: Tensor | None = None,
        *,
        control: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """control (B, L, dim), the control stream (the first block: the patch-embedded control
        tokens); hidden (B, L, dim), the main stream (read by the first block only); the other
        arguments as in :meth:`WanBlock.forward` -> (control (B, L, dim), hint (B, L, dim))."""
        if self.before_proj is not None:
            control = self.before_proj(control) + hidden
        control = super().forward(
            control, context, modulation, rope, num_image_tokens, self_attention, context_bias
        )
        return control, self.after_proj(control)


class WanHead(nn.Module):
    """Final modulated LayerNorm, projection to patches, and unpatchify."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.patch_size = cfg.patch_size
        self.out_channels = cfg.out_channels
        self.norm = Fp32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = _modulation_table(2, dim)

    def forward(self, hidden: Tensor, temb: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """hidden (B, L, dim), temb (B, dim) or (B, L, dim) float32, grid (f, h, w) tokens
        -> (B, C_out, f*pt, h*ph, w*pw)."""
        if temb.ndim == 2:
            temb = temb.unsqueeze(1)
        shift, scale = _modulation_rows(self.modulation, temb.unsqueeze(2))
        x = (self.norm(hidden.float()) * (1 + scale) + shift).to(hidden.dtype)
        x = self.head(x)
        f, h, w = grid
        pt, ph, pw = self.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], self.out_channels, f * pt, h * ph, w * pw)


class ImageProjection(nn.Module):
    """CLIP image tokens -> model width (I2V), with FLF2V's learned position table."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        assert cfg.image_dim is not None
        self.proj = nn.Sequential(
            Fp32LayerNorm(cfg.image_dim),
            nn.Linear(cfg.image_dim, cfg.image_dim),
            nn.GELU(),
            nn.Linear(cfg.image_dim, cfg.dim),
            Fp32LayerNorm(cfg.dim),
        )
        self.emb_pos: nn.Parameter | None = None
        if cfg.pos_embed_seq_len is not None:
            self.emb_pos = nn.Parameter(torch.zeros(1, cfg.pos_embed_seq_len, cfg.image_dim))

    def forward(self, image_embeds: Tensor) -> Tensor:
        """image_embeds (B, Li, image_dim) -> (B, Li, dim); FLF2V: Li = pos_embed_seq_len."""
        if self.emb_pos is not None:
            if image_embeds.shape[1] != self.emb_pos.shape[1]:
                raise ValueError(
                    f"this model takes exactly {self.emb_pos.shape[1]} image tokens per sample "
                    f"(first and last frame), got {image_embeds.shape[1]}"
                )
            image_embeds = image_embeds + self.emb_pos
        return self.proj(image_embeds)
