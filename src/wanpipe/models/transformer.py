"""The Wan 2.1 / 2.2 diffusion transformer (DiT), assembled from :mod:`wanpipe.models.transformer_layers`.

Parameter names follow the original Wan repositories (``wan/modules/model.py``); diffusers
checkpoints are renamed at load by the key table of ``weights/transformer_keys.py``.

The model is run one stage at a time so an executor can compile, offload or stream blocks::

    x = model.embed(latents, timestep, text_embeds, image_embeds)   # VACE: + control latents and scales
    hidden = run_blocks(model.block_sequence(vace=x.control is not None), x.hidden, x)   # Animate: animate=
    out = model.head(hidden, x.temb, x.grid)

:func:`run_blocks` is the one place the blocks are called (through :func:`call_block`): the plain
forward below, the compiled one (``call=torch.compile(call_block)``), the streamed one (``blocks`` an
iterator of device-resident copies) and the sequence-parallel one (``self_attention`` over the ranks)
all go through it. A VACE model's sequence holds its VACE blocks too, each just before the main block its hint goes to.
An Animate model's (``animate=True``: face video given) holds its face adapter blocks, each just after
the main block it follows (0, 5, 10, ...; :mod:`wanpipe.models.animate`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wanpipe.models.animate import FaceBlock, FaceEncoder, MotionEncoder
from wanpipe.models.transformer_layers import (
    AttentionFn,
    ImageProjection,
    Rope,
    TransformerConfig,
    VaceBlock,
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
    control: Tensor | None = None
    """VACE: (B, L, dim) the control tokens (``vace_patch_embedding`` of the control latents), model
    dtype; None: no VACE blocks run."""
    control_scale: Tensor | None = None
    """VACE: (B, num_vace_layers) float32, each hint's scale; None without ``control``."""
    motion: Tensor | None = None
    """Animate: (B, f, heads + 1, dim) the face motion tokens of each latent frame (the first frame's are
    zeros), model dtype; None: no face adapter blocks run."""
    num_face_blocks: int = 0
    """Animate: how many face adapter blocks :func:`run_blocks` must run (0 without ``motion``)."""


class WanTransformerModel(nn.Module):
    """The Wan DiT (T2V, I2V, FLF2V, TI2V, VACE, Animate) built from a :class:`TransformerConfig`.

    VACE models (``config.vace_layers``) add ``vace_patch_embedding`` and ``vace_blocks``: given control
    latents, VACE block k runs on the control stream just before main block ``vace_layers[k]`` and its
    hint, times its scale, is added to that block's output (:meth:`block_sequence`, :func:`run_blocks`).

    Animate models (``config.is_animate``) add ``pose_patch_embedding`` (the pose latents' tokens are added
    to those of every latent frame but the first, the reference), ``motion_encoder`` and ``face_encoder``
    (face video -> motion tokens per latent frame) and ``face_adapter`` blocks run after every
    ``inject_face_latents_blocks``-th main block.
    """

    keep_in_fp32: tuple[str, ...] = (
        r"time_embedding\..+",
        r"((vace_)?blocks\.\d+|head)\.modulation",
        r"(vace_)?blocks\.\d+\.norm3\..+",
        r"img_emb\.proj\.[04]\..+",
        r"motion_encoder\.motion_synthesis_weight",
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
        self.vace_patch_embedding: nn.Conv3d | None = None
        self.vace_blocks: nn.ModuleList | None = None
        if config.vace_in_channels is not None:
            self.vace_patch_embedding = nn.Conv3d(
                config.vace_in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
            )
            self.vace_blocks = nn.ModuleList(
                VaceBlock(config, first=k == 0) for k in range(config.num_vace_layers)
            )
        self.pose_patch_embedding: nn.Conv3d | None = None
        self.motion_encoder: MotionEncoder | None = None
        self.face_encoder: FaceEncoder | None = None
        self.face_adapter: nn.ModuleList | None = None
        if config.is_animate:
            assert config.latent_channels is not None
            self.pose_patch_embedding = nn.Conv3d(
                config.latent_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
            )
            self.motion_encoder = MotionEncoder(config)
            self.face_encoder = FaceEncoder(config)
            self.face_adapter = nn.ModuleList(FaceBlock(config) for _ in range(config.num_face_blocks))
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
        control_hidden_states: Tensor | None = None,
        control_hidden_states_scale: Tensor | None = None,
        pose_hidden_states: Tensor | None = None,
        face_pixel_values: Tensor | None = None,
        motion_encode_batch_size: int | None = None,
    ) -> DiTInputs:
        """Patchify the latents and embed the conditions.

        latents (B, C_in, F, H, W); timestep (B,) or per-token (B, L) floats in [0, 1000];
        text_embeds (B, Lt, text_dim); image_embeds (B, Li, image_dim) for I2V models, else None;
        text_bias (B, Lt) float, the text attention's logit bias (:func:`compress_text_padding`) or None.
        VACE models: control_hidden_states (B, vace_in_channels, F, H, W), the control latents (None: the
        VACE blocks do not run); control_hidden_states_scale (num_vace_layers,) or (B, num_vace_layers),
        each hint's scale (None: ones). Animate models (both required): pose_hidden_states
        (B, latent_channels, F - 1, H, W), the pose latents of every latent frame but the first;
        face_pixel_values (B, 3, T, S, S) in [-1, 1], S = ``motion_encoder_size``, with
        ceil(ceil(T / 2) / 2) = F - 1; motion_encode_batch_size: face frames per motion-encoder call (memory
        only; None: the config's).
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
        motion = self._embed_face(
            face_pixel_values, pose_hidden_states, latents.shape, motion_encode_batch_size
        )
        patches = self.patch_embedding(latents.to(dtype))
        if pose_hidden_states is not None and self.pose_patch_embedding is not None:
            pose = self.pose_patch_embedding(pose_hidden_states.to(dtype))
            patches = torch.cat([patches[:, :, :1], patches[:, :, 1:] + pose], dim=2)
        hidden = patches.flatten(2).transpose(1, 2).contiguous()

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
        control, control_scale = self._embed_control(
            control_hidden_states, control_hidden_states_scale, latents.shape
        )

        return DiTInputs(
            hidden=hidden,
            context=context,
            modulation=modulation,
            temb=temb,
            rope=self.compute_rope(*grid, device=latents.device),
            grid=grid,
            num_image_tokens=num_image_tokens,
            context_bias=context_bias,
            control=control,
            control_scale=control_scale,
            motion=motion,
            num_face_blocks=0 if motion is None else cfg.num_face_blocks,
        )

    def _embed_face(
        self, face: Tensor | None, pose: Tensor | None, latent_shape: torch.Size, batch_size: int | None
    ) -> Tensor | None:
        """Animate: face (B, 3, T, S, S), pose (B, C_lat, F - 1, H, W) checked against the latents (B, C_in,
        F, H, W) -> the motion tokens (B, F, heads + 1, dim), model dtype; None for other models."""
        cfg = self.config
        if self.motion_encoder is None or self.face_encoder is None:
            if face is not None or pose is not None:
                raise ValueError(
                    "this model is not an Animate model: it takes no pose_hidden_states / face_pixel_values"
                )
            return None
        if face is None or pose is None:
            raise ValueError("this Animate model needs pose_hidden_states and face_pixel_values")
        batch, _, frames, height, width = latent_shape
        expected = (batch, cfg.latent_channels, frames - 1, height, width)
        if tuple(pose.shape) != expected:
            raise ValueError(
                f"pose_hidden_states must have shape {expected} (batch, latent_channels, the latents' frames "
                f"but the first (the reference), height and width), got {tuple(pose.shape)}"
            )
        size = cfg.motion_encoder_size
        if face.ndim != 5 or face.shape[0] != batch or face.shape[1] != 3 or face.shape[3:] != (size, size):
            raise ValueError(
                f"face_pixel_values must have shape ({batch}, 3, T, {size}, {size}) (batch, RGB, face "
                f"frames, motion_encoder_size squared), got {tuple(face.shape)}"
            )
        num_face = face.shape[2]
        encoded = ((num_face + 1) // 2 + 1) // 2  # ceil(ceil(T / 2) / 2): the face encoder's stride-2 convs
        if encoded != frames - 1:
            raise ValueError(
                f"face_pixel_values has {num_face} frames, which the face encoder makes {encoded} latent "
                f"frames; the latents have {frames} (the reference frame, then {frames - 1}: give "
                f"{max(1, 4 * (frames - 1) - 3)} to {4 * (frames - 1)} face frames)"
            )
        step = batch_size or cfg.motion_encoder_batch_size or 8
        if step < 1:
            raise ValueError(f"motion_encode_batch_size must be positive, got {step}")
        faces = face.transpose(1, 2).flatten(0, 1)  # (B * T, 3, S, S), frame-major per sample
        vectors = torch.cat([self.motion_encoder(chunk) for chunk in faces.split(step)])
        motion = self.face_encoder(vectors.unflatten(0, (batch, num_face)))
        return torch.cat([torch.zeros_like(motion[:, :1]), motion], dim=1)

    def _embed_control(
        self, control: Tensor | None, scale: Tensor | None, latent_shape: torch.Size
    ) -> tuple[Tensor | None, Tensor | None]:
        """control (B, vace_in_channels, F, H, W), scale (n,) | (B, n) | None -> control tokens
        (B, L, dim) in the model dtype and scales (B, n) float32; (None, None) without control."""
        if control is None:
            if scale is not None:
                raise ValueError("control_hidden_states_scale needs control_hidden_states")
            return None, None
        embedding = self.vace_patch_embedding
        if embedding is None:
            raise ValueError("this model has no VACE blocks: it takes no control_hidden_states")
        cfg = self.config
        batch, n = latent_shape[0], cfg.num_vace_layers
        expected = (batch, cfg.vace_in_channels, *latent_shape[2:])
        if tuple(control.shape) != expected:
            # diffusers zero-pads control tokens missing at the end, which misaligns them: refused.
            raise ValueError(
                f"control_hidden_states must have shape {expected} (batch, vace_in_channels and the "
                f"latents' frames, height and width), got {tuple(control.shape)}"
            )
        if scale is None:
            scale = torch.ones(batch, n, device=control.device)
        elif scale.ndim == 1 and scale.shape[0] == n:
            scale = scale.expand(batch, n)
        elif tuple(scale.shape) != (batch, n):
            raise ValueError(
                f"control_hidden_states_scale must have shape ({n},) or ({batch}, {n}) (one value per VACE "
                f"layer), got {tuple(scale.shape)}"
            )
        tokens = embedding(control.to(embedding.weight.dtype)).flatten(2).transpose(1, 2).contiguous()
        return tokens, scale.to(device=tokens.device, dtype=torch.float32)

    def block_sequence(self, vace: bool = False, animate: bool = False) -> list[nn.Module]:
        """The blocks in the order :func:`run_blocks` runs them: the main blocks, and with ``vace`` (control
        tokens given) each VACE block just before the main block at its layer (``config.vace_layers``);
        with ``animate`` (motion tokens given) face adapter block k just after main block
        ``k * inject_face_latents_blocks``."""
        every = self.config.inject_face_latents_blocks
        if animate and self.face_adapter is not None and every is not None:
            faces = dict(zip(range(0, len(self.blocks), every), self.face_adapter))
            return [
                b for i, main in enumerate(self.blocks) for b in ((main, faces[i]) if i in faces else (main,))
            ]
        if not vace or self.vace_blocks is None or self.config.vace_layers is None:
            return list(self.blocks)
        at = dict(zip(self.config.vace_layers, self.vace_blocks))
        return [b for i, main in enumerate(self.blocks) for b in ((at[i], main) if i in at else (main,))]

    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        text_embeds: Tensor,
        image_embeds: Tensor | None = None,
        text_bias: Tensor | None = None,
        control_hidden_states: Tensor | None = None,
        control_hidden_states_scale: Tensor | None = None,
        pose_hidden_states: Tensor | None = None,
        face_pixel_values: Tensor | None = None,
        motion_encode_batch_size: int | None = None,
    ) -> Tensor:
        """Predict the flow: latents (B, C_in, F, H, W), timestep (B,) or (B, L),
        text_embeds (B, Lt, text_dim), image_embeds (B, Li, image_dim) | None,
        text_bias (B, Lt) | None (see :func:`compress_text_padding`); VACE models:
        control_hidden_states (B, vace_in_channels, F, H, W) | None, control_hidden_states_scale
        (num_vace_layers,) | (B, num_vace_layers) | None (ones); Animate models: pose_hidden_states
        (B, latent_channels, F - 1, H, W), face_pixel_values (B, 3, T, S, S), motion_encode_batch_size
        (see :meth:`embed`) -> (B, C_out, F, H, W)."""
        x = self.embed(
            latents,
            timestep,
            text_embeds,
            image_embeds,
            text_bias,
            control_hidden_states,
            control_hidden_states_scale,
            pose_hidden_states,
            face_pixel_values,
            motion_encode_batch_size,
        )
        blocks = self.block_sequence(vace=x.control is not None, animate=x.motion is not None)
        return self.head(run_blocks(blocks, x.hidden, x), x.temb, x.grid)


BlockOutput = Tensor | tuple[Tensor, Tensor]
"""A main block's hidden (B, L, dim), or a VACE block's (control, hint), each (B, L, dim)."""

BlockCall = Callable[
    [nn.Module, Tensor, Tensor, Tensor, Rope, int, Tensor | None, AttentionFn, Tensor | None, Tensor | None],
    BlockOutput,
]
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
    control: Tensor | None = None,
    motion: Tensor | None = None,
) -> BlockOutput:
    """One block, positional arguments only (what ``torch.compile`` gets): see :meth:`WanBlock.forward`;
    a VACE block (:class:`VaceBlock`) also gets the control stream ``control`` and returns (control, hint);
    a face adapter block (:class:`FaceBlock`) gets only ``hidden`` and the motion tokens ``motion``."""
    args: tuple = (hidden, context, modulation, rope, num_image_tokens, self_attention)
    extra: dict = (
        {"context_bias": context_bias}
        if control is None
        else {"context_bias": context_bias, "control": control}
    )
    if motion is not None:
        args, extra = (hidden, motion), {}
    return block(*args, **extra)


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
    the model's blocks, a slice of them, or an iterator of device-resident copies (block offload), in
    :meth:`WanTransformerModel.block_sequence`'s order: with control tokens (``x.control``, VACE) a VACE
    block's hint, times its scale, is added to the output of the main block that follows it, and the
    sequence must hold all of the model's VACE blocks; with motion tokens (``x.motion``, Animate) a face
    adapter block adds its output to the main stream, and the sequence must hold them all. ``call``: :func:`call_block` or its compiled form;
    ``self_attention``: see :meth:`SelfAttention.forward`.
    """
    context, modulation, bias = x.context, x.modulation, x.context_bias
    control, scale, motion = x.control, x.control_scale, x.motion
    if rows is not None:
        context, modulation = context[rows], modulation[rows]
        bias = None if bias is None else bias[rows]
        if control is not None and scale is not None:
            control, scale = control[rows], scale[rows]
        motion = None if motion is None else motion[rows]
    hint: Tensor | None = None
    hints = faces = 0
    for block in blocks:
        face, vace = isinstance(block, FaceBlock), isinstance(block, VaceBlock)
        if face and motion is None:
            raise ValueError("a face adapter block needs motion tokens (face_pixel_values)")
        if vace and control is None:
            raise ValueError("a VACE block needs control tokens (control_hidden_states)")
        # the one call of every block: a face block's last argument is the motion tokens, a VACE block's
        # the control stream
        extra = (None, motion) if face else (control if vace else None,)
        out = call(
            block, hidden, context, modulation, x.rope, x.num_image_tokens, bias, self_attention, *extra
        )
        if face:
            assert isinstance(out, Tensor)
            hidden, faces = out, faces + 1
            continue
        if isinstance(
            out, tuple
        ):  # a VACE block: the control stream goes on, its hint waits for a main block
            control, hint = out
            continue
        hidden = out
        if hint is not None and scale is not None:
            hidden = hidden + hint * scale[:, hints, None, None].to(hint.dtype)
            hint, hints = None, hints + 1
    if x.control is not None and x.control_scale is not None and hints != x.control_scale.shape[1]:
        raise ValueError(
            f"run_blocks added {hints} of the {x.control_scale.shape[1]} VACE hints: run the whole "
            "WanTransformerModel.block_sequence(vace=True)"
        )
    if faces != x.num_face_blocks:
        raise ValueError(
            f"run_blocks ran {faces} of the {x.num_face_blocks} face adapter blocks: run the whole "
            "WanTransformerModel.block_sequence(animate=True)"
        )
    return hidden
