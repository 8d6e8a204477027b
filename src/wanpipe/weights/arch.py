"""A checkpoint's :class:`~wanpipe.config.WanArchConfig`, read from its files: a diffusers folder
(``model_index.json`` and each component's config) or the parts an original folder or single files
give (with the original repositories' sampling settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wanpipe.config import WanArchConfig, detect_variant
from wanpipe.models.image_encoder import ImageProcessorConfig
from wanpipe.models.text_encoder import TextEncoderConfig
from wanpipe.models.transformer_layers import TransformerConfig
from wanpipe.models.vae import VAEConfig
from wanpipe.schedulers import SchedulerConfig
from wanpipe.weights.loader import read_json
from wanpipe.weights.original import ORIGINAL_SAMPLING, original_sampling_defaults
from wanpipe.weights.safetensors_io import CheckpointError


def _present(entry: Any) -> bool:
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def check_experts(transformer: TransformerConfig, transformer_2: TransformerConfig | None) -> None:
    """The two experts of Wan 2.2 A14B must have the same shape (inputs, width, VACE blocks)."""
    if transformer_2 is None:
        return
    shape = [(c.in_channels, c.dim, c.vace_layers, c.vace_in_channels) for c in (transformer, transformer_2)]
    if shape[0] != shape[1]:
        raise CheckpointError(
            f"the two experts differ in shape (in_channels {transformer.in_channels} vs "
            f"{transformer_2.in_channels}, width {transformer.dim} vs {transformer_2.dim}, VACE layers "
            f"{transformer.vace_layers} vs {transformer_2.vace_layers}, VACE in-channels "
            f"{transformer.vace_in_channels} vs {transformer_2.vace_in_channels})"
        )


def read_diffusers_arch(folder: str | Path) -> WanArchConfig:
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
        transformer_2 = TransformerConfig.from_dict(component("transformer_2")) if _present(second) else None
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
    check_experts(transformer, transformer_2)
    variant = detect_variant(
        transformer,
        vae,
        has_second_expert=transformer_2 is not None,
        demo=bool(index.get("_wanpipe_demo")),
    )
    return WanArchConfig(
        folder,
        variant,
        transformer,
        vae,
        text_encoder,
        scheduler,
        transformer_2=transformer_2,
        boundary_ratio=index.get("boundary_ratio"),
        expand_timesteps=bool(index.get("expand_timesteps", False)),
        image_encoder=image_encoder,
        image_processor=image_processor,
        components={k: v for k, v in index.items() if not k.startswith("_")},
    )


def arch_from_parts(
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
    original_defaults: bool = False,
) -> WanArchConfig:
    """An arch config from component configs read elsewhere (an original ``config.json``, tensor
    shapes of single files). The scheduler is the original repositories' UniPC with their shift
    (:data:`wanpipe.weights.original.ORIGINAL_SAMPLING`) on ``sigma_grid`` ("original" by default,
    to reproduce their results; "diffusers" for diffusers' grid). ``original_defaults``: requests get
    the original scripts' defaults (:data:`wanpipe.weights.original.ORIGINAL_DEFAULTS`: negative
    prompt, steps, guidance, the 480P shift), else the variant's."""
    check_experts(transformer, transformer_2)
    variant = detect_variant(transformer, vae, has_second_expert=transformer_2 is not None)
    sampling = ORIGINAL_SAMPLING.get(variant.name, {})
    scheduler = SchedulerConfig(
        kind="unipc",
        flow_shift=float(flow_shift if flow_shift is not None else sampling.get("flow_shift", 5.0)),
        sigma_grid=sigma_grid,  # type: ignore[arg-type]
    )
    if transformer_2 is not None and boundary_ratio is None:
        boundary_ratio = sampling.get("boundary_ratio", 0.875)
    return WanArchConfig(
        Path(path),
        variant,
        transformer,
        vae,
        text_encoder,
        scheduler,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio if transformer_2 is not None else None,
        expand_timesteps=vae.z_dim == 48,  # Wan 2.2 TI2V-5B: per-token timesteps
        image_encoder=image_encoder,
        image_processor=image_processor if image_encoder is not None else None,
        components=dict(components or {}),
        sampling=original_sampling_defaults(variant) if original_defaults else None,
    )
