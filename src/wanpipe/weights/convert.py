"""``wanpipe convert``: write any checkpoint wanpipe reads as a diffusers-layout folder (sharded
safetensors) or as an original Wan repository folder, through the key tables (nothing is run).

fp8 tensors are dequantized (``dtype``, default bfloat16 for them); other tensors keep their dtype unless
``dtype`` is given. The VAE is always written in float32 when ``dtype`` is None.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from wanpipe.config import WanArchConfig
from wanpipe.models.transformer_layers import ANIMATE_FIELDS
from wanpipe.weights.components import ComponentWeights
from wanpipe.weights.fp8 import is_fp8, prepare_fp8_state
from wanpipe.weights.gguf_quants import has_gguf, resolve_gguf_state
from wanpipe.weights.image_encoder_keys import clip_runtime_to_original
from wanpipe.weights.keymap import remap_state_dict
from wanpipe.weights.original import (
    ORIGINAL_CLIP_FILE,
    ORIGINAL_EXPERT_DIRS,
    T5_TO_ORIGINAL_KEYS,
    vae21_to_original_tables,
    vae22_to_original_tables,
)
from wanpipe.weights.text_encoder_keys import TEXT_ENCODER_ALIASES
from wanpipe.weights.transformer_keys import TRANSFORMER_TO_DIFFUSERS_KEYS
from wanpipe.weights.vae_keys import vae_to_diffusers_keys

DEFAULT_SHARD_BYTES = 5 * 1024**3


SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
"""``parse_size``'s units (binary: 1KB = 1024 bytes, as huggingface's ``max_shard_size``)."""


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"200MB"``, ``"64KB"``, ``"1.5GB"`` or a number of bytes; at least 1 byte.
    ValueError (naming the allowed forms) for anything else."""
    allowed = "expected a size such as 5GB, 200MB, 64KB (units B, KB, MB, GB, TB) or a number of bytes"
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?B)?\s*", str(text), re.I)
        if match is None:
            raise ValueError(f"{allowed}, got {text!r}")
        amount = float(match.group(1)) * SIZE_UNITS[(match.group(2) or "B").upper()]
        if not math.isfinite(amount):
            raise ValueError(f"{allowed}, got {text!r}")
        value = int(amount)
    if value < 1:
        raise ValueError(f"a shard size must be at least 1 byte, got {text!r}")
    return value


def _resolved(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """fp8 and GGUF tensors dequantized (to ``dtype``, default bfloat16 for them); others as they are."""
    gguf = has_gguf(state)
    state = resolve_gguf_state(state) if gguf else state
    fp8 = any(is_fp8(v) for v in state.values()) or any(
        k.endswith((".scale_weight", ".weight_scale")) for k in state
    )
    out = prepare_fp8_state(state)[0] if fp8 else dict(state)
    target = dtype if dtype is not None else (torch.bfloat16 if fp8 or gguf else None)
    if target is not None:
        out = {k: v.to(target) if v.is_floating_point() else v for k, v in out.items()}
    return out


def _text_encoder_state(weights: ComponentWeights, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The UMT5 encoder's tensors to write: without the tied copies (``TEXT_ENCODER_ALIASES``)."""
    return {
        k: v for k, v in _resolved(weights.text_encoder(), dtype).items() if k not in TEXT_ENCODER_ALIASES
    }


def write_sharded(
    state: Mapping[str, torch.Tensor], folder: Path, stem: str, max_shard_bytes: int
) -> list[Path]:
    """``{stem}.safetensors``, or ``{stem}-0000i-of-0000n.safetensors`` + ``{stem}.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (
        [f"{stem}.safetensors"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for keys, name in zip(shards, names):
        save_file({k: state[k].detach().clone().contiguous() for k in keys}, str(folder / name))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
            "weight_map": {k: name for keys, name in zip(shards, names) for k in keys},
        }
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [folder / n for n in names]


def _json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def _dit_class(cfg) -> str:
    if cfg.is_animate:
        return "WanAnimateTransformer3DModel"
    return "WanVACETransformer3DModel" if cfg.vace_layers is not None else "WanTransformer3DModel"


def _dit_config_diffusers(arch_dit) -> dict[str, Any]:
    cfg = asdict(arch_dit)
    cfg["patch_size"] = list(cfg["patch_size"])
    if arch_dit.vace_layers is None:
        del cfg["vace_layers"], cfg["vace_in_channels"]  # WanTransformer3DModel takes neither
    else:
        cfg["vace_layers"] = list(cfg["vace_layers"])
    if not arch_dit.is_animate:
        for key in ANIMATE_FIELDS:  # WanTransformer3DModel takes none of them
            del cfg[key]
    elif arch_dit.motion_encoder_channel_sizes is not None:
        cfg["motion_encoder_channel_sizes"] = {str(k): v for k, v in arch_dit.motion_encoder_channel_sizes}
    return {"_class_name": _dit_class(arch_dit), **cfg}


def write_diffusers(
    arch: WanArchConfig,
    weights: ComponentWeights,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_BYTES,
) -> Path:
    """A diffusers-layout folder that diffusers' ``WanPipeline.from_pretrained`` and wanpipe read."""
    out = Path(out)
    shard = parse_size(max_shard_size)
    experts = [("transformer", arch.transformer, weights.transformer)]
    if arch.transformer_2 is not None and weights.transformer_2 is not None:
        experts.append(("transformer_2", arch.transformer_2, weights.transformer_2))
    for name, cfg, load in experts:
        state = remap_state_dict(_resolved(load(), dtype), TRANSFORMER_TO_DIFFUSERS_KEYS)
        write_sharded(state, out / name, "diffusion_pytorch_model", shard)
        _json(out / name / "config.json", _dit_config_diffusers(cfg))
    vae_state = remap_state_dict(_resolved(weights.vae(), dtype), vae_to_diffusers_keys(arch.vae.is_residual))
    write_sharded(vae_state, out / "vae", "diffusion_pytorch_model", shard)
    vae_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(arch.vae).items()}
    _json(out / "vae" / "config.json", {"_class_name": "AutoencoderKLWan", **vae_cfg})
    write_sharded(_text_encoder_state(weights, dtype), out / "text_encoder", "model", shard)
    _json(out / "text_encoder" / "config.json", dict(arch.text_encoder.raw))
    _copy_tokenizer(weights.tokenizer, out / "tokenizer")
    sched = arch.scheduler
    _json(
        out / "scheduler" / "scheduler_config.json",
        {
            "_class_name": "UniPCMultistepScheduler"
            if sched.kind == "unipc"
            else "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": sched.num_train_timesteps,
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": True,
            ("flow_shift" if sched.kind == "unipc" else "shift"): sched.flow_shift,
            "solver_order": sched.solver_order,
            "solver_type": sched.solver_type,
            "lower_order_final": sched.lower_order_final,
            "final_sigmas_type": sched.final_sigmas_type,
        },
    )
    image = arch.image_encoder is not None and weights.image_encoder is not None
    index: dict[str, Any] = {
        "_class_name": "WanAnimatePipeline"
        if arch.accepts_animate
        else "WanImageToVideoPipeline"
        if arch.takes_image
        else "WanVACEPipeline"
        if arch.accepts_vace
        else "WanPipeline",
        "_diffusers_version": "0.35.0",
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "transformer": ["diffusers", _dit_class(arch.transformer)],
        "transformer_2": ["diffusers", _dit_class(arch.transformer)] if len(experts) == 2 else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": [
            "diffusers",
            "UniPCMultistepScheduler" if sched.kind == "unipc" else "FlowMatchEulerDiscreteScheduler",
        ],
        "boundary_ratio": arch.boundary_ratio,
        "expand_timesteps": arch.expand_timesteps,
    }
    if arch.takes_image or arch.accepts_animate:
        index["image_encoder"] = ["transformers", "CLIPVisionModel"] if image else [None, None]
        index["image_processor"] = ["transformers", "CLIPImageProcessor"] if image else [None, None]
    if image:
        assert weights.image_encoder is not None and arch.image_encoder is not None
        write_sharded(_resolved(weights.image_encoder(), dtype), out / "image_encoder", "model", shard)
        _json(
            out / "image_encoder" / "config.json",
            {"architectures": ["CLIPVisionModel"], **arch.image_encoder},
        )
        proc = arch.image_processor
        if proc is not None:
            _json(
                out / "image_processor" / "preprocessor_config.json",
                {
                    "image_processor_type": "CLIPImageProcessor",
                    "size": {"shortest_edge": proc.shortest_edge},
                    "crop_size": {"height": proc.crop_height, "width": proc.crop_width},
                    "do_resize": proc.do_resize,
                    "do_center_crop": proc.do_center_crop,
                    "do_rescale": proc.do_rescale,
                    "rescale_factor": proc.rescale_factor,
                    "do_normalize": proc.do_normalize,
                    "image_mean": list(proc.image_mean),
                    "image_std": list(proc.image_std),
                    "resample": proc.resample,
                },
            )
    _json(out / "model_index.json", index)
    return out


def original_dit_config(cfg, task: str) -> dict[str, Any]:
    """An original ``config.json`` (``WanModel`` keyword arguments; ``VaceWanModel``'s for VACE) for a DiT
    config."""
    vace = {}
    if cfg.vace_layers is not None:
        vace = {
            "_class_name": "VaceWanModel",
            "vace_layers": list(cfg.vace_layers),
            "vace_in_dim": cfg.vace_in_channels,
        }
    return {
        "_class_name": "WanModel",
        "model_type": task,
        "patch_size": list(cfg.patch_size),
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "text_dim": cfg.text_dim,
        "in_dim": cfg.in_channels,
        "out_dim": cfg.out_channels,
        "num_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_layers,
        "qk_norm": cfg.qk_norm is not None,
        "cross_attn_norm": cfg.cross_attn_norm,
        "eps": cfg.eps,
        "text_len": 512,
        **vace,
    }


def write_original(
    arch: WanArchConfig,
    weights: ComponentWeights,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_BYTES,
) -> Path:
    """An original Wan repository folder (``config.json`` + DiT shards, or the two expert folders;
    ``Wan2.1_VAE.pth`` or ``Wan2.2_VAE.pth``; ``models_t5_umt5-xxl-enc-bf16.pth``; ``google/umt5-xxl/``;
    Wan 2.1 I2V/FLF2V: ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` with the vision tower
    only: the original's text tower is not held by other layouts)."""
    out = Path(out)
    shard = parse_size(max_shard_size)
    experts = [(out, arch.transformer, weights.transformer)]
    if arch.transformer_2 is not None and weights.transformer_2 is not None:
        experts = [
            (out / ORIGINAL_EXPERT_DIRS[0], arch.transformer, weights.transformer),
            (out / ORIGINAL_EXPERT_DIRS[1], arch.transformer_2, weights.transformer_2),
        ]
    for folder, cfg, load in experts:
        write_sharded(_resolved(load(), dtype), folder, "diffusion_pytorch_model", shard)
        _json(folder / "config.json", original_dit_config(cfg, arch.variant.task))
    tables = vae22_to_original_tables if arch.vae.is_residual else vae21_to_original_tables
    inner, outer = tables(arch.vae.num_res_blocks, len(arch.vae.dim_mult))
    vae_state = remap_state_dict(remap_state_dict(_resolved(weights.vae(), dtype), inner), outer)
    vae_file = "Wan2.2_VAE.pth" if arch.vae.is_residual else "Wan2.1_VAE.pth"
    torch.save({k: v.clone() for k, v in vae_state.items()}, out / vae_file)
    if arch.image_encoder is not None and weights.image_encoder is not None:
        clip_state = clip_runtime_to_original(_resolved(weights.image_encoder(), dtype))
        torch.save({k: v.clone() for k, v in clip_state.items()}, out / ORIGINAL_CLIP_FILE)
    te_state = remap_state_dict(_text_encoder_state(weights, dtype), T5_TO_ORIGINAL_KEYS)
    torch.save({k: v.clone() for k, v in te_state.items()}, out / "models_t5_umt5-xxl-enc-bf16.pth")
    _copy_tokenizer(weights.tokenizer, out / "google" / "umt5-xxl")
    return out
