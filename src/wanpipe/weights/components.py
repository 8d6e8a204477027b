"""Where a pipeline's weights come from, whatever the layout: each component as a state dict in
runtime names (wanpipe's DiT/VAE names, transformers' UMT5/CLIP names), opened lazily.

- diffusers layout (``model_index.json`` + component folders): :func:`diffusers_weights`;
- the original Wan repositories (``config.json`` + ``diffusion_pytorch_model*.safetensors``, or
  ``high_noise_model/`` + ``low_noise_model/``; ``Wan2.1_VAE.pth``; ``models_t5_umt5-xxl-enc-bf16.pth``;
  ``google/umt5-xxl/``): :func:`original_weights`;
- single files (ComfyUI's repackaged files, any naming, fp16/bf16/fp8): :func:`single_file_weights`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wanpipe.config import WanArchConfig
from wanpipe.models.image_encoder import ImageProcessorConfig
from wanpipe.weights.arch import arch_from_parts, read_diffusers_arch
from wanpipe.weights.fp8 import dequantize_state
from wanpipe.weights.gguf_quants import dit_gguf_keep, resolve_gguf_state
from wanpipe.weights.loader import open_component_weights, read_json
from wanpipe.weights.original import (
    ORIGINAL_EXPERT_DIRS,
    ORIGINAL_T5_FILES,
    ORIGINAL_TOKENIZER_DIRS,
    ORIGINAL_VAE_FILES,
    UMT5_XXL_TOKENIZER_ID,
)
from wanpipe.weights.safetensors_io import CheckpointError, SafetensorsIndex
from wanpipe.weights.single_file import (
    clip_to_runtime,
    infer_transformer_config,
    open_weights_file,
    strip_prefix,
    text_encoder_to_runtime,
    transformer_config_from_original,
    transformer_to_runtime,
    vae_to_runtime,
)
from wanpipe.weights.transformer_keys import prepare_transformer_state
from wanpipe.weights.vae_keys import prepare_vae_state

logger = logging.getLogger(__name__)

StateFn = Callable[[], Mapping[str, torch.Tensor]]

TOKENIZER_ALLOW_PATTERNS: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
)


@dataclass(frozen=True)
class ComponentWeights:
    """Each component's weights as a function returning a fresh state dict in runtime names (fresh:
    swapped experts must not alias the resident module's tensors)."""

    tokenizer: Path
    text_encoder: StateFn
    transformer: StateFn
    vae: StateFn
    transformer_2: StateFn | None = None
    image_encoder: StateFn | None = None


# -- diffusers layout ---------------------------------------------------------------------------------


def diffusers_weights(folder: Path, arch: WanArchConfig) -> ComponentWeights:
    def component(name: str, prepare: Callable | None = None) -> StateFn:
        def load() -> Mapping[str, torch.Tensor]:
            state = open_component_weights(folder, name)
            return prepare(state) if prepare is not None else state

        return load

    return ComponentWeights(
        tokenizer=folder / "tokenizer",
        text_encoder=component("text_encoder", dequantize_state),
        transformer=component("transformer", prepare_transformer_state),
        vae=component("vae", lambda s: prepare_vae_state(dequantize_state(s))),
        transformer_2=component("transformer_2", prepare_transformer_state)
        if arch.transformer_2 is not None
        else None,
        image_encoder=component("image_encoder", dequantize_state)
        if arch.image_encoder is not None and arch.transformer.image_dim is not None
        else None,
    )


# -- single files -------------------------------------------------------------------------------------


def _dit_file(paths: list[Path]) -> Mapping[str, torch.Tensor]:
    """One DiT from a file, a list of shard files, or a folder of ``*.safetensors`` shards."""
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        if list(folder.glob("*.safetensors.index.json")):
            return SafetensorsIndex.from_folder(folder, "transformer")
        files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
        if not files:
            raise CheckpointError(f"transformer: no diffusion_pytorch_model*.safetensors in {folder}")
        return SafetensorsIndex(files)
    if len(paths) == 1:
        return open_weights_file(paths[0], "transformer")
    return SafetensorsIndex(paths)


VACE_MODULE_KEYS = r"vace_blocks\.\d+\..+|vace_patch_embedding\..+"
"""The tensors of a VACE module held as its own file (Kijai's ``Wan2_1-VACE_module_*.safetensors``)."""


def _vace_module(paths: list[Path]) -> dict[str, torch.Tensor]:
    """A VACE module file (prefix stripped) in runtime names; only VACE tensors are allowed in it."""
    state = strip_prefix(_dit_file(paths), "transformer")
    other = sorted(k for k in state if not re.fullmatch(VACE_MODULE_KEYS, k))
    if other or not state:
        raise CheckpointError(
            f"vace: {paths[0]} is not a VACE module: it holds {len(other)} tensors that are not "
            f"vace_blocks.* / vace_patch_embedding.* (first: {other[:4]}); a whole VACE model goes in transformer="
        )
    return prepare_transformer_state(state)  # diffusers names renamed; original names pass as they are


def _dit(paths: list[Path], vace: list[Path] | None = None) -> StateFn:
    """One DiT in runtime names; ``vace``: its VACE module, a file of its own (ComfyUI / Kijai)."""

    def load() -> Mapping[str, torch.Tensor]:
        state = transformer_to_runtime(strip_prefix(_dit_file(paths), "transformer"))
        state = resolve_gguf_state(state, dit_gguf_keep)  # GGUF: the blocks' linears stay quantized
        if vace is None:
            return state
        if any(re.fullmatch(VACE_MODULE_KEYS, k) for k in state):
            raise CheckpointError(
                f"vace: the transformer file {paths[0]} holds VACE blocks already; give vace= only with a "
                "base (text-to-video) DiT"
            )
        return {**state, **resolve_gguf_state(_vace_module(vace), dit_gguf_keep)}

    return load


def _one_file(path: Path, component: str) -> dict[str, torch.Tensor]:
    """A one-file VAE, text or image encoder: opened, its wrapper prefix stripped, fp8 and GGUF
    dequantized."""
    return dequantize_state(resolve_gguf_state(strip_prefix(open_weights_file(path, component), component)))


def _vae(path: Path) -> StateFn:
    return lambda: vae_to_runtime(_one_file(path, "vae"))[0]


def _text_encoder(path: Path) -> StateFn:
    return lambda: text_encoder_to_runtime(_one_file(path, "text_encoder"))[0]


def _image_encoder(path: Path, num_heads: int | None) -> StateFn:
    return lambda: clip_to_runtime(_one_file(path, "image_encoder"), num_heads=num_heads)[0]


def _paths(value: str | Path | list[str | Path]) -> list[Path]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [Path(p).expanduser() for p in items]


def resolve_tokenizer(tokenizer: str | Path | None, *, download: Callable[..., str] | None = None) -> Path:
    """A local tokenizer folder as it is; a hub id (default: the UMT5-XXL tokenizer the original code
    uses, ``google/umt5-xxl``) through ``huggingface_hub.snapshot_download`` (tokenizer files only)."""
    text = str(tokenizer) if tokenizer is not None else UMT5_XXL_TOKENIZER_ID
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    from wanpipe.weights.loader import is_hub_id

    if not is_hub_id(text):
        raise CheckpointError(f"tokenizer: {text!r} is neither a folder nor a hub id")
    if download is None:
        from huggingface_hub import snapshot_download

        download = snapshot_download
    logger.info("downloading the tokenizer %s from the Hugging Face hub", text)
    return Path(download(repo_id=text, allow_patterns=list(TOKENIZER_ALLOW_PATTERNS)))


def single_file_weights(
    transformer: str | Path | list[str | Path],
    vae: str | Path,
    text_encoder: str | Path,
    transformer_2: str | Path | list[str | Path] | None = None,
    image_encoder: str | Path | None = None,
    tokenizer: str | Path | None = None,
    *,
    num_heads: int | None = None,
    dit_config: Mapping[str, Any] | None = None,
    sigma_grid: str = "original",
    path: str | Path | None = None,
    vace: str | Path | list[str | Path] | None = None,
    vace_2: str | Path | list[str | Path] | None = None,
    original_defaults: bool = False,
) -> tuple[WanArchConfig, ComponentWeights]:
    """Read the configs of one-file components from their tensors; ``dit_config`` (an original
    ``config.json``) may add the head count, eps and VACE layers. ``vace`` / ``vace_2``: the VACE module
    of ``transformer`` / ``transformer_2`` as a file of its own (only ``vace_*`` tensors), joined to a
    base text-to-video DiT (Wan 2.2 VACE-Fun A14B: one per expert)."""
    extra = transformer_config_from_original(dit_config or {})
    heads = num_heads if num_heads is not None else extra.get("num_heads")
    eps = extra.get("eps", 1e-6)
    vace_layers = extra.get("vace_layers")
    if (vace is None) != (vace_2 is None) and transformer_2 is not None:
        raise CheckpointError(
            "vace: a two-expert DiT (transformer_2) takes one VACE module per expert: give vace and vace_2"
        )
    if vace_2 is not None and transformer_2 is None:
        raise CheckpointError("vace_2 is the low-noise expert's VACE module: give transformer_2 too")
    dit_paths = _paths(transformer)
    dit = _dit(dit_paths, _paths(vace) if vace is not None else None)
    dit_cfg = infer_transformer_config(dit(), num_heads=heads, eps=eps, vace_layers=vace_layers)
    dit2 = None
    dit2_cfg = None
    if transformer_2 is not None:
        dit2 = _dit(_paths(transformer_2), _paths(vace_2) if vace_2 is not None else None)
        dit2_cfg = infer_transformer_config(dit2(), num_heads=heads, eps=eps, vace_layers=vace_layers)
    vae_path, te_path = Path(vae).expanduser(), Path(text_encoder).expanduser()
    vae_cfg = vae_to_runtime(_one_file(vae_path, "vae"))[1]
    te_cfg = text_encoder_to_runtime(_one_file(te_path, "text_encoder"))[1]
    clip_cfg = None
    clip_fn = None
    if dit_cfg.image_dim is not None:
        if image_encoder is None:
            raise CheckpointError(
                "this DiT takes CLIP image tokens (Wan 2.1 I2V/FLF2V): pass a CLIP vision file (transformers "
                "naming, or the original models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth) as the image encoder"
            )
        clip_path = Path(image_encoder).expanduser()
        clip_cfg = clip_to_runtime(_one_file(clip_path, "image_encoder"))[1]
        clip_fn = _image_encoder(clip_path, None)
    tok = resolve_tokenizer(tokenizer)
    arch = arch_from_parts(
        path if path is not None else dit_paths[0],
        transformer=dit_cfg,
        transformer_2=dit2_cfg,
        vae=vae_cfg,
        text_encoder=te_cfg,
        image_encoder=clip_cfg,
        image_processor=ImageProcessorConfig() if clip_cfg is not None else None,
        sigma_grid=sigma_grid,
        original_defaults=original_defaults,
    )
    weights = ComponentWeights(
        tokenizer=tok,
        text_encoder=_text_encoder(te_path),
        transformer=dit,
        vae=_vae(vae_path),
        transformer_2=dit2,
        image_encoder=clip_fn,
    )
    return arch, weights


# -- the original repositories' layout ----------------------------------------------------------------


def is_original_layout(folder: Path) -> bool:
    """An original Wan repository: no model_index.json, a DiT config.json (or expert folders) and the
    T5 / VAE files."""
    if (folder / "model_index.json").is_file():
        return False
    has_dit = (folder / "config.json").is_file() or all((folder / d).is_dir() for d in ORIGINAL_EXPERT_DIRS)
    has_files = any((folder / f).is_file() for f in (*ORIGINAL_T5_FILES, *ORIGINAL_VAE_FILES))
    return has_dit and has_files


def _first(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(f"{folder}: the original layout needs {what} (one of {list(names)})")


def original_weights(folder: Path, *, sigma_grid: str = "original") -> tuple[WanArchConfig, ComponentWeights]:
    """An original Wan repository folder (Wan2.1-T2V-1.3B, Wan2.2-T2V-A14B with expert folders, ...)."""
    experts = [folder / d for d in ORIGINAL_EXPERT_DIRS]
    two = all(e.is_dir() for e in experts)
    config_folder = experts[0] if two else folder
    dit_config = read_json(config_folder / "config.json", "transformer")
    if "dim" not in dit_config or "num_layers" not in dit_config:
        raise CheckpointError(
            f"{config_folder / 'config.json'} is not an original Wan DiT config (no 'dim'/'num_layers')"
        )
    tokenizer = _first(folder, ORIGINAL_TOKENIZER_DIRS, "the UMT5 tokenizer folder")
    # Wan 2.1 I2V/FLF2V: the original open-clip .pth, or a CLIP vision file in transformers names.
    clip = sorted(folder.glob("models_clip_*.safetensors")) + sorted(folder.glob("models_clip_*.pth"))
    image_encoder = clip[0] if clip else None
    arch, weights = single_file_weights(
        transformer=experts[0] if two else folder,
        transformer_2=experts[1] if two else None,
        vae=_first(folder, ORIGINAL_VAE_FILES, "the VAE file"),
        text_encoder=_first(folder, ORIGINAL_T5_FILES, "the UMT5 encoder file"),
        image_encoder=image_encoder,
        tokenizer=tokenizer,
        dit_config=dit_config,
        sigma_grid=sigma_grid,
        path=folder,
        original_defaults=True,  # an original folder reproduces the original scripts
    )
    return arch, weights


def open_checkpoint(
    path_or_id: str | Path | None = None,
    *,
    sigma_grid: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    **single_files: Any,
) -> tuple[WanArchConfig, ComponentWeights]:
    """Any layout: a diffusers or original folder / hub id, or single files (``transformer=``, ``vae=``,
    ``text_encoder=``, ``transformer_2=``, ``image_encoder=``, ``tokenizer=``, ``vace=``, ``vace_2=``)."""
    from wanpipe.weights.loader import resolve_checkpoint

    files = {k: v for k, v in single_files.items() if v is not None}
    if path_or_id is None:
        missing = [k for k in ("transformer", "vae", "text_encoder") if k not in files]
        if missing:
            raise CheckpointError(f"single files: {', '.join(missing)} missing (or give a checkpoint folder)")
        return single_file_weights(**files, sigma_grid=sigma_grid or "original")
    if files:
        raise CheckpointError(f"give a checkpoint folder or single files, not both ({sorted(files)})")
    folder = resolve_checkpoint(path_or_id, revision=revision, cache_dir=cache_dir)
    if is_original_layout(folder):
        return original_weights(folder, sigma_grid=sigma_grid or "original")
    arch = read_diffusers_arch(folder)
    if sigma_grid is not None:
        arch = arch.with_sigma_grid(sigma_grid)
    return arch, diffusers_weights(folder, arch)
