"""The Wan 2.1 / 2.2 diffusion transformer (DiT), assembled from :mod:`wanpipe.models.transformer_layers`.

Parameter names follow the original Wan repositories (``wan/modules/model.py``); diffusers
checkpoints are renamed at load by the key table of ``weights/transformer_keys.py``.

The model is run one stage at a time so an executor can compile, offload or stream blocks::

    x = model.embed(latents, timestep, text_embeds, image_embeds)
    hidden = run_blocks(model.blocks, x.hidden, x)
    out = model.head(hidden, x.temb, x.grid)

:func:`run_blocks` is the one place the blocks are called (through :func:`call_block`): the plain
forward below, the compiled one (``call=torch.compile(call_block)``), the streamed one (``blocks`` an
iterator of device-resident copies) and the sequence-parallel one (``self_attention`` over the ranks)
all go through it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wanpipe.models.transformer_layers import (
    AttentionFn,
    ImageProjection,
    Rope,
    TransformerConfig,
    WanBlock,
    WanHead,
    attention,
    rope_angles,
    timestep_sinusoid,
)

# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class DiTInputs:
    """What :meth:`WanTransformerModel.embed` hands to the blocks and the head."""

    hidden: Tensor
    """(B, L, dim) patch tokens, model dtype; L = f * h * w."""
    context: Tensor
    """(B, Li + Lt, dim) image tokens (I2V) then text tokens, model dtype."""
    modulation: Tensor
    """(B, 6, dim) float32, or (B, L, 6, dim) for per-token timesteps."""
    temb: Tensor
    """(B, dim) float32, or (B, L, dim) for per-token timesteps."""
    rope: Rope
    """cos, sin (L, head_dim / 2) float32."""
    grid: tuple[int, int, int]
    """(f, h, w): the latent size in tokens."""
    num_image_tokens: int = 0
    """Li: how many leading context tokens are image tokens (0 for text-only models)."""
    context_bias: Tensor | None = None
    """(B, 1, 1, Lt) additive logit bias of the text attention in the context's dtype
    (:func:`compress_text_padding`), or None: plain attention over all Lt text tokens."""


class WanTransformerModel(nn.Module):
    """The Wan DiT (T2V, I2V, FLF2V, TI2V) built from a :class:`TransformerConfig`."""

    keep_in_fp32: tuple[str, ...] = (
        r"time_embedding\..+",
        r"(blocks\.\d+|head)\.modulation",
        r"blocks\.\d+\.norm3\..+",
        r"img_emb\.proj\.[04]\..+",
    )
    """Parameter names (``re.fullmatch``) that stay float32 when the model runs in bf16/fp16."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = WanHead(config)
        self.img_emb = ImageProjection(config) if config.image_dim is not None else None
        self._rope_cache: dict[tuple[int, int, int, torch.device], Rope] = {}

    # -- weights -------------------------------------------------------------------------------

    @classmethod
    def keeps_fp32(cls, name: str) -> bool:
        """Whether parameter ``name`` must stay float32 under a low-precision model dtype."""
        return any(re.fullmatch(p, name) for p in cls.keep_in_fp32)

    @torch.no_grad()
    def reload_model_weights(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy another checkpoint of the same shape into this model's tensors, in place.

        No module is rebuilt and no tensor is replaced, so compiled or captured code keeps working:
        this is how one set of modules serves both Wan 2.2 experts. ``state_dict`` is in our names
        (a diffusers checkpoint renamed through ``weights/transformer_keys.py``); each tensor is cast
        to the parameter's dtype and device.
        """
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(params))
        if missing or unexpected:
            raise ValueError(f"reload_model_weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, param in params.items():
            source = state_dict[name]
            if tuple(source.shape) != tuple(param.shape):
                raise ValueError(
                    f"reload_model_weights: {name} has shape {list(source.shape)}, the model {list(param.shape)}"
                )
            param.copy_(source, non_blocking=True)

    # -- RoPE ----------------------------------------------------------------------------------

    def compute_rope(
        self, num_frames: int, height: int, width: int, device: torch.device | None = None
    ) -> Rope:
        """3-D RoPE tables for a (num_frames, height, width) token grid, cached per (grid, device).

        Returns cos, sin (L, head_dim / 2) float32 with L = num_frames * height * width in
        frame-major order; angles are computed in float64 on the CPU.
        """
        device = torch.device(device) if device is not None else self.patch_embedding.weight.device
        key = (num_frames, height, width, device)
        cached = self._rope_cache.get(key)
        if cached is not None:
            return cached
        limit = self.config.rope_max_seq_len
        if max(num_frames, height, width) > limit:
            raise ValueError(
                f"token grid {(num_frames, height, width)} exceeds rope_max_seq_len={limit} on some axis"
            )
        dt, dh, dw = self.config.rope_dims
        grid = (num_frames, height, width)
        parts = (
            rope_angles(num_frames, dt)[:, None, None].expand(*grid, -1),
            rope_angles(height, dh)[None, :, None].expand(*grid, -1),
            rope_angles(width, dw)[None, None, :].expand(*grid, -1),
        )
        angles = torch.cat(parts, dim=-1).reshape(num_frames * height * width, -1)
        rope = (angles.cos().float().to(device), angles.sin().float().to(device))
        self._rope_cache[key] = rope
        return rope

    def clear_rope_cache(self) -> None:
        """Drop every cached RoPE table."""
        self._rope_cache.clear()

    # -- stages --------------------------------------------------------------------------------

    def embed(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_embeds: Tensor,
        image_embeds: Tensor | None = None,
        text_bias: Tensor | None = None,
    ) -> DiTInputs:
        """Patchify the latents and embed the conditions.

        latents (B, C_in, F, H, W); timestep (B,) or per-token (B, L) floats in [0, 1000];
        text_embeds (B, Lt, text_dim); image_embeds (B, Li, image_dim) for I2V models, else None;
        text_bias (B, Lt) float, the text attention's logit bias (:func:`compress_text_padding`) or None.
        """
        cfg = self.config
        batch, _, frames, height, width = latents.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(
                f"latent size {(frames, height, width)} is not a multiple of patch {cfg.patch_size}"
            )
        grid = (frames // pt, height // ph, width // pw)
        num_tokens = math.prod(grid)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.shape not in ((batch,), (batch, num_tokens)):
            raise ValueError(
                f"timestep must have shape ({batch},) or ({batch}, {num_tokens}), got {tuple(timestep.shape)}"
            )
        if (image_embeds is None) != (self.img_emb is None):
            need = "needs" if self.img_emb is not None else "takes no"
            raise ValueError(f"this model {need} image_embeds")
        if text_bias is not None and tuple(text_bias.shape) != tuple(text_embeds.shape[:2]):
            raise ValueError(
                f"text_bias must have shape {tuple(text_embeds.shape[:2])} (batch, text tokens), "
                f"got {tuple(text_bias.shape)}"
            )

        dtype = self.patch_embedding.weight.dtype
        hidden = self.patch_embedding(latents.to(dtype)).flatten(2).transpose(1, 2).contiguous()

        time_dtype = self.time_embedding[0].weight.dtype
        temb = self.time_embedding(timestep_sinusoid(timestep, cfg.freq_dim).to(time_dtype)).float()
        proj_dtype = self.time_projection[1].weight.dtype
        modulation = self.time_projection(temb.to(proj_dtype)).float().unflatten(-1, (6, cfg.dim))

        context = self.text_embedding(text_embeds.to(self.text_embedding[0].weight.dtype))
        num_image_tokens = 0
        if self.img_emb is not None and image_embeds is not None:
            image = self.img_emb(image_embeds.to(self.img_emb.proj[1].weight.dtype))
            num_image_tokens = image.shape[1]
            context = torch.cat([image, context.to(image.dtype)], dim=1)
        context_bias = None if text_bias is None else text_bias[:, None, None, :].to(context.dtype)

        return DiTInputs(
            hidden=hidden,
            context=context,
            modulation=modulation,
            temb=temb,
            rope=self.compute_rope(*grid, device=latents.device),
            grid=grid,
            num_image_tokens=num_image_tokens,
            context_bias=context_bias,
        )

    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_embeds: Tensor,
        image_embeds: Tensor | None = None,
        text_bias: Tensor | None = None,
    ) -> Tensor:
        """Predict the flow: latents (B, C_in, F, H, W), timestep (B,) or (B, L),
        text_embeds (B, Lt, text_dim), image_embeds (B, Li, image_dim) | None,
        text_bias (B, Lt) | None (see :func:`compress_text_padding`) -> (B, C_out, F, H, W)."""
        x = self.embed(latents, timestep, text_embeds, image_embeds, text_bias)
        return self.head(run_blocks(self.blocks, x.hidden, x), x.temb, x.grid)


BlockCall = Callable[[nn.Module, Tensor, Tensor, Tensor, Rope, int, Tensor | None, AttentionFn], Tensor]
"""The signature of :func:`call_block` (and of its compiled form)."""


def call_block(
    block: nn.Module,
    hidden: Tensor,
    context: Tensor,
    modulation: Tensor,
    rope: Rope,
    num_image_tokens: int,
    context_bias: Tensor | None,
    self_attention: AttentionFn,
) -> Tensor:
    """One block, positional arguments only (what ``torch.compile`` gets): see :meth:`WanBlock.forward`."""
    return block(
        hidden, context, modulation, rope, num_image_tokens, self_attention, context_bias=context_bias
    )


def run_blocks(
    blocks: Iterable[nn.Module],
    hidden: Tensor,
    x: DiTInputs,
    *,
    rows: Tensor | slice | None = None,
    call: BlockCall = call_block,
    self_attention: AttentionFn = attention,
) -> Tensor:
    """hidden (B', L, dim) through ``blocks`` in order -> (B', L, dim): the one call site of the DiT blocks.

    ``x``: :meth:`WanTransformerModel.embed`'s output for the whole batch; ``rows`` selects the batch
    rows ``hidden`` holds (a step cache running one guidance stream alone), None for all. ``blocks``:
    the model's blocks, a slice of them, or an iterator of device-resident copies (block offload).
    ``call``: :func:`call_block` or its compiled form; ``self_attention``: see :meth:`SelfAttention.forward`.
    """
    context, modulation, bias = x.context, x.modulation, x.context_bias
    if rows is not None:
        context, modulation = context[rows], modulation[rows]
        bias = None if bias is None else bias[rows]
    for block in blocks:
        hidden = call(block, hidden, context, modulation, x.rope, x.num_image_tokens, bias, self_attention)
    return hidden
