"""WanArchConfig: the pipeline-level view of a Wan checkpoint, read once from its folder.

Typed component configs (DiT, VAE, text encoder, scheduler), the detected variant, the text length
(512 tokens, no KV cache) and the family's default sampling values
(``shared/reference/wan-facts.md``: the original repositories' defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wanpipe.models.image_encoder import ImageProcessorConfig
from wanpipe.models.text_encoder import TextEncoderConfig
from wanpipe.models.transformer_layers import TransformerConfig
from wanpipe.models.vae import VAEConfig
from wanpipe.schedulers import SchedulerConfig

TEXT_MAX_SEQ_LEN = 512


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for every value it leaves out."""

    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float | None = None
    fps: int = 16
    negative_prompt: str = ""
    flow_shift_480p: float | None = None
    """The shift a request of at most 832 x 480 pixels gets when it gives none (None: the scheduler's at
    every size); the original Wan 2.1 I2V script's 3.0."""


@dataclass(frozen=True)
class WanVariant:
    """A member of the Wan family: its name, task and defaults."""

    name: str
    task: str  # "t2v", "i2v", "flf2v", "ti2v", "vace", "animate"
    version: str  # "2.1" or "2.2"
    defaults: SamplingDefaults


_T2V_480P = SamplingDefaults(height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0)
_T2V_720P = replace(_T2V_480P, height=720, width=1280)

VARIANTS: dict[str, WanVariant] = {
    v.name: v
    for v in (
        WanVariant("wan2.1-t2v-1.3b", "t2v", "2.1", _T2V_480P),
        WanVariant("wan2.1-t2v-14b", "t2v", "2.1", _T2V_720P),
        WanVariant("wan2.1-i2v-14b", "i2v", "2.1", replace(_T2V_720P, num_inference_steps=40)),
        WanVariant("wan2.1-flf2v-14b", "flf2v", "2.1", replace(_T2V_720P, num_inference_steps=40)),
        WanVariant(
            "wan2.2-t2v-a14b",
            "t2v",
            "2.2",
            replace(_T2V_720P, num_inference_steps=40, guidance_scale=4.0, guidance_scale_2=3.0),
        ),
        WanVariant(
            "wan2.2-i2v-a14b",
            "i2v",
            "2.2",
            replace(_T2V_720P, num_inference_steps=40, guidance_scale=3.5, guidance_scale_2=3.5),
        ),
        WanVariant(
            "wan2.2-ti2v-5b",
            "ti2v",
            "2.2",
            SamplingDefaults(704, 1280, 121, 50, 5.0, fps=24),
        ),
        # VACE (the original repositories' 50 steps and guide scale 5.0; 1.3B is a 480P model). Wan 2.2
        # VACE-Fun A14B is built on T2V-A14B and takes its defaults.
        WanVariant("wan2.1-vace-1.3b", "vace", "2.1", _T2V_480P),
        WanVariant("wan2.1-vace-14b", "vace", "2.1", _T2V_720P),
        WanVariant(
            "wan2.2-vace-fun-a14b",
            "vace",
            "2.2",
            replace(_T2V_720P, num_inference_steps=40, guidance_scale=4.0, guidance_scale_2=3.0),
        ),
        # Wan2.2-Animate-14B: a driving video's pose and face frames animate a character image. diffusers'
        # WanAnimatePipeline defaults (720 x 1280, segments of 77 frames, 20 steps, guidance 1.0) and the
        # original repository's wan/configs/wan_animate_14B.py (the same, 30 fps).
        WanVariant(
            "wan2.2-animate-14b",
            "animate",
            "2.2",
            replace(_T2V_720P, num_frames=77, num_inference_steps=20, guidance_scale=1.0, fps=30),
        ),
        # The built-in demo checkpoint: tiny random weights, small defaults so it runs anywhere.
        WanVariant("demo", "t2v", "2.1", SamplingDefaults(128, 128, 9, 8, 5.0)),
    )
}


def detect_variant(
    transformer: TransformerConfig,
    vae: VAEConfig,
    *,
    has_second_expert: bool,
    demo: bool = False,
) -> WanVariant:
    """Name the family member from the checkpoint's shapes (random tiny checkpoints included: the
    task comes from the structure, the size from the DiT width)."""
    if demo:
        return VARIANTS["demo"]
    if transformer.is_animate:
        return VARIANTS["wan2.2-animate-14b"]
    if vae.z_dim == 48:
        return VARIANTS["wan2.2-ti2v-5b"]
    if transformer.vace_layers is not None:
        if has_second_expert:
            return VARIANTS["wan2.2-vace-fun-a14b"]
        return VARIANTS["wan2.1-vace-14b" if transformer.dim >= 5120 else "wan2.1-vace-1.3b"]
    image_conditioned = transformer.in_channels != transformer.out_channels
    if has_second_expert:
        return VARIANTS["wan2.2-i2v-a14b" if image_conditioned else "wan2.2-t2v-a14b"]
    if image_conditioned:
        return VARIANTS["wan2.1-flf2v-14b" if transformer.pos_embed_seq_len else "wan2.1-i2v-14b"]
    return VARIANTS["wan2.1-t2v-14b" if transformer.dim >= 5120 else "wan2.1-t2v-1.3b"]


@dataclass(frozen=True)
class WanArchConfig:
    """Pipeline-level config of a Wan checkpoint (no KV cache; fixed 512-token text context)."""

    path: Path
    variant: WanVariant
    transformer: TransformerConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    scheduler: SchedulerConfig
    transformer_2: TransformerConfig | None = None
    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    image_encoder: dict[str, Any] | None = None  # CLIP vision config (Wan 2.1 I2V / FLF2V)
    image_processor: ImageProcessorConfig | None = None
    components: dict[str, Any] = field(default_factory=dict)
    sampling: SamplingDefaults | None = None
    """The checkpoint's own request defaults (original folders: the original scripts',
    ``wanpipe.weights.original.ORIGINAL_DEFAULTS``); None: the variant's."""

    def get_max_seq_len(self) -> int:
        """The text context length every prompt is padded to (512 UMT5 tokens)."""
        return TEXT_MAX_SEQ_LEN

    @property
    def defaults(self) -> SamplingDefaults:
        return self.sampling if self.sampling is not None else self.variant.defaults

    def default_flow_shift(self, height: int, width: int) -> float:
        """The shift of a request of this size that gives none: the scheduler's, or the defaults'
        ``flow_shift_480p`` at 480P areas (height x width <= 832 x 480)."""
        low = self.defaults.flow_shift_480p
        if low is not None and height * width <= 832 * 480:
            return low
        return self.scheduler.flow_shift

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this: VAE stride x DiT patch (16 for Wan 2.1)."""
        return self.vae.spatial_stride * self.transformer.patch_size[1]

    @property
    def temporal_stride(self) -> int:
        return self.vae.temporal_stride

    @property
    def has_second_expert(self) -> bool:
        return self.transformer_2 is not None

    @property
    def boundary_timestep(self) -> float | None:
        """The high-noise expert runs while t >= this (Wan 2.2 A14B); None with one expert."""
        if self.boundary_ratio is None or self.transformer_2 is None:
            return None
        return float(self.boundary_ratio) * self.scheduler.num_train_timesteps

    @property
    def takes_image(self) -> bool:
        """An image-to-video checkpoint (the first frame is required)."""
        return self.variant.task in ("i2v", "flf2v")

    @property
    def accepts_image(self) -> bool:
        """Image conditioning is possible (required for i2v/flf2v, optional for TI2V-5B)."""
        return self.takes_image or self.variant.task == "ti2v"

    @property
    def accepts_last_image(self) -> bool:
        """First-last-frame: FLF2V (CLIP with position embeddings for two images) or a CLIP-free
        image-to-video checkpoint (Wan 2.2 I2V-A14B)."""
        dit = self.transformer
        return self.takes_image and (dit.image_dim is None or dit.pos_embed_seq_len is not None)

    @property
    def accepts_vace(self) -> bool:
        """A VACE checkpoint: its DiT has VACE blocks (control video, mask, reference images)."""
        return self.transformer.vace_layers is not None

    @property
    def accepts_animate(self) -> bool:
        """A Wan2.2-Animate checkpoint: its DiT takes pose latents and face frames (``variant.task`` is
        "animate"; the character image goes through the CLIP image encoder and the VAE)."""
        return self.transformer.is_animate

    @property
    def in_channels_condition(self) -> int:
        """Channels of the mask + condition latents concatenated to the noise (0 without)."""
        return self.transformer.in_channels - self.transformer.out_channels

    def with_sigma_grid(self, sigma_grid: str) -> WanArchConfig:
        """The same checkpoint sampled on another sigma grid ("diffusers" or "original")."""
        return replace(self, scheduler=replace(self.scheduler, sigma_grid=sigma_grid))  # type: ignore[arg-type]
