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
from wanpipe.weights.loader import read_json
from wanpipe.weights.safetensors_io import CheckpointError

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


@dataclass(frozen=True)
class WanVariant:
    """A member of the Wan family: its name, task and defaults."""

    name: str
    task: str  # "t2v", "i2v", "flf2v", "ti2v"
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
    if vae.z_dim == 48:
        return VARIANTS["wan2.2-ti2v-5b"]
    image_conditioned = transformer.in_channels != transformer.out_channels
    if has_second_expert:
        return VARIANTS["wan2.2-i2v-a14b" if image_conditioned else "wan2.2-t2v-a14b"]
    if image_conditioned:
        return VARIANTS["wan2.1-flf2v-14b" if transformer.pos_embed_seq_len else "wan2.1-i2v-14b"]
    return VARIANTS["wan2.1-t2v-14b" if transformer.dim >= 5120 else "wan2.1-t2v-1.3b"]


def _present(entry: Any) -> bool:
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


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

    def get_max_seq_len(self) -> int:
        """The text context length every prompt is padded to (512 UMT5 tokens)."""
        return TEXT_MAX_SEQ_LEN

    @property
    def defaults(self) -> SamplingDefaults:
        return self.variant.defaults

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
    def in_channels_condition(self) -> int:
        """Channels of the mask + condition latents concatenated to the noise (0 without)."""
        return self.transformer.in_channels - self.transformer.out_channels

    @classmethod
    def from_folder(cls, folder: str | Path) -> WanArchConfig:
        """Read ``model_index.json`` and every component's config from a diffusers-layout folder."""
        folder = Path(folder)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise CheckpointError(
                f"{folder} is not a Wan checkpoint in the diffusers layout: it has no model_index.json "
                "(expected model_index.json with transformer/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        index = read_json(index_path, "model_index.json")
        pipeline_class = str(index.get("_class_name", ""))
        if not pipeline_class.startswith("Wan"):
            raise CheckpointError(f"{folder}: model_index.json names {pipeline_class!r}, not a Wan pipeline")
        for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
            entry = index.get(name)
            if not isinstance(entry, list) or entry[0] is None:
                raise CheckpointError(f"{folder}: model_index.json has no {name!r} component")
        if not _present(index.get("transformer")):
            raise CheckpointError(f"{folder}: model_index.json has no 'transformer' component")

        def component(name: str, file: str = "config.json") -> dict[str, Any]:
            return read_json(folder / name / file, name)

        try:
            transformer = TransformerConfig.from_dict(component("transformer"))
            second = index.get("transformer_2")
            transformer_2 = (
                TransformerConfig.from_dict(component("transformer_2")) if _present(second) else None
            )
            image_encoder = component("image_encoder") if _present(index.get("image_encoder")) else None
            image_processor = (
                ImageProcessorConfig.from_dict(component("image_processor", "preprocessor_config.json"))
                if _present(index.get("image_processor"))
                else None
            )
            vae = VAEConfig.from_dict(component("vae"))
            text_encoder = TextEncoderConfig.from_dict(component("text_encoder"))
            scheduler = SchedulerConfig.from_dict(component("scheduler", "scheduler_config.json"))
        except (TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{folder}: unusable component config: {e}") from e
        variant = detect_variant(
            transformer,
            vae,
            has_second_expert=transformer_2 is not None,
            demo=bool(index.get("_wanpipe_demo")),
        )
        return cls(
            path=folder,
            variant=variant,
            transformer=transformer,
            transformer_2=transformer_2,
            vae=vae,
            text_encoder=text_encoder,
            scheduler=scheduler,
            boundary_ratio=index.get("boundary_ratio"),
            expand_timesteps=bool(index.get("expand_timesteps", False)),
            image_encoder=image_encoder,
            image_processor=image_processor,
            components={k: v for k, v in index.items() if not k.startswith("_")},
        )

    @classmethod
    def from_parts(
        cls,
        path: str | Path,
        *,
        transformer: TransformerConfig,
        vae: VAEConfig,
        text_encoder: TextEncoderConfig,
        transformer_2: TransformerConfig | None = None,
        image_encoder: dict[str, Any] | None = None,
        image_processor: ImageProcessorConfig | None = None,
        flow_shift: float | None = None,
        boundary_ratio: float | None = None,
        sigma_grid: str = "original",
        components: dict[str, Any] | None = None,
    ) -> WanArchConfig:
        """An arch config from component configs read elsewhere (an original ``config.json``, tensor
        shapes of single files). The scheduler is the original repositories' UniPC with their shift
        (:data:`wanpipe.weights.original.ORIGINAL_SAMPLING`) on ``sigma_grid`` ("original" by default,
        to reproduce their results; "diffusers" for diffusers' grid)."""
        from wanpipe.weights.original import ORIGINAL_SAMPLING

        if transformer_2 is not None and (
            transformer_2.in_channels != transformer.in_channels or transformer_2.dim != transformer.dim
        ):
            raise CheckpointError(
                f"the two experts differ in shape (in_channels {transformer.in_channels} vs "
                f"{transformer_2.in_channels}, width {transformer.dim} vs {transformer_2.dim})"
            )
        variant = detect_variant(transformer, vae, has_second_expert=transformer_2 is not None)
        sampling = ORIGINAL_SAMPLING.get(variant.name, {})
        scheduler = SchedulerConfig(
            kind="unipc",
            flow_shift=float(flow_shift if flow_shift is not None else sampling.get("flow_shift", 5.0)),
            sigma_grid=sigma_grid,  # type: ignore[arg-type]
        )
        if transformer_2 is not None and boundary_ratio is None:
            boundary_ratio = sampling.get("boundary_ratio", 0.875)
        return cls(
            path=Path(path),
            variant=variant,
            transformer=transformer,
            transformer_2=transformer_2,
            vae=vae,
            text_encoder=text_encoder,
            scheduler=scheduler,
            boundary_ratio=boundary_ratio if transformer_2 is not None else None,
            expand_timesteps=vae.z_dim == 48,  # Wan 2.2 TI2V-5B: per-token timesteps
            image_encoder=image_encoder,
            image_processor=image_processor if image_encoder is not None else None,
            components=dict(components or {}),
        )

    def with_sigma_grid(self, sigma_grid: str) -> WanArchConfig:
        """The same checkpoint sampled on another sigma grid ("diffusers" or "original")."""
        return replace(self, scheduler=replace(self.scheduler, sigma_grid=sigma_grid))  # type: ignore[arg-type]
