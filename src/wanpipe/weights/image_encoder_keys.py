"""Loading the CLIP image encoder (transformers' ``CLIPVisionModel``): its key map, the buffer that
checkpoints do not hold, and the original open-clip file's names
(``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from wanpipe.weights.keymap import KeyMap, KeyTable, remap_state_dict


def clip_key_map(model: nn.Module) -> Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Checkpoints name the tower ``vision_model.*`` (older transformers) or not (transformers 5):
    rename to whichever the installed transformers builds."""
    nested = hasattr(model, "vision_model")
    rules: KeyMap = (
        ((r"(?!vision_model\.)(.+)", r"vision_model.\1"),) if nested else ((r"vision_model\.(.+)", r"\1"),)
    )

    def prepare(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return remap_state_dict(state_dict, rules)

    return prepare


def materialize_clip_buffers(model: nn.Module) -> None:
    """Recreate CLIP's non-persistent ``position_ids`` buffer (not in checkpoints) after a meta build."""
    embeddings = model.vision_model.embeddings if hasattr(model, "vision_model") else model.embeddings
    device = embeddings.position_embedding.weight.device
    positions = torch.arange(embeddings.num_positions, device=device).expand((1, -1))
    embeddings.register_buffer("position_ids", positions, persistent=False)


# -- the original open-clip file of Wan 2.1 I2V / FLF2V -----------------------------------------------

CLIP_ORIGINAL_KEYS = KeyTable(
    (
        ("visual.patch_embedding.weight", "embeddings.patch_embedding.weight"),
        ("visual.cls_embedding", "embeddings.class_embedding"),
        ("visual.pos_embedding", "embeddings.position_embedding.weight"),
        ("visual.pre_norm.{wb}", "pre_layrnorm.{wb}"),
        ("visual.post_norm.{wb}", "post_layernorm.{wb}"),
        ("visual.transformer.{n}.norm1.{wb}", "encoder.layers.{n}.layer_norm1.{wb}"),
        ("visual.transformer.{n}.norm2.{wb}", "encoder.layers.{n}.layer_norm2.{wb}"),
        ("visual.transformer.{n}.attn.to_qkv.{wb}", "encoder.layers.{n}.self_attn.qkv_proj.{wb}"),
        ("visual.transformer.{n}.attn.proj.{wb}", "encoder.layers.{n}.self_attn.out_proj.{wb}"),
        ("visual.transformer.{n}.mlp.0.{wb}", "encoder.layers.{n}.mlp.fc1.{wb}"),
        ("visual.transformer.{n}.mlp.2.{wb}", "encoder.layers.{n}.mlp.fc2.{wb}"),
    )
)
"""``(open-clip .pth, transformers CLIPVisionModel)`` names of the vision tower: the original
``wan/modules/clip.py`` ``VisionTransformer`` (``XLMRobertaCLIP.visual``). ``qkv_proj`` is the fused
projection, split into ``q_proj``/``k_proj``/``v_proj`` (:data:`CLIP_FUSED_QKV`)."""

CLIP_ORIGINAL_DROPPED = r"textual\..+|log_scale|visual\.head"
"""The text tower, the logit scale and the vision projection head: not used by Wan (it takes the tokens
of the second-to-last block)."""

CLIP_FUSED_QKV = ("qkv_proj", ("q_proj", "k_proj", "v_proj"))
"""The fused attention projection (rows q, k, v) and the three it is split into."""

CLIP_ORIGINAL_SHAPES: dict[str, int] = {
    "embeddings.class_embedding": 1,
    "embeddings.position_embedding.weight": 2,
}
"""Tensors whose original shape has leading singleton dimensions (``(1, 1, D)``, ``(1, N, D)``): the
number of dimensions transformers keeps."""


def is_clip_original(state: Mapping[str, torch.Tensor]) -> bool:
    return "visual.patch_embedding.weight" in state


def clip_original_to_runtime(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open-clip ``.pth`` state dict -> the vision tower in transformers names (without ``vision_model.``)."""
    kept = {k: v for k, v in state.items() if not re.fullmatch(CLIP_ORIGINAL_DROPPED, k)}
    renamed = remap_state_dict(kept, CLIP_ORIGINAL_KEYS.to_runtime())
    fused, parts = CLIP_FUSED_QKV
    out: dict[str, torch.Tensor] = {}
    for key, value in renamed.items():
        if f".{fused}." in key:
            for part, chunk in zip(parts, value.chunk(3, dim=0)):
                out[key.replace(f".{fused}.", f".{part}.")] = chunk
        elif key in CLIP_ORIGINAL_SHAPES:
            out[key] = value.reshape(value.shape[-CLIP_ORIGINAL_SHAPES[key] :])
        else:
            out[key] = value
    return out


def clip_runtime_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower in transformers names (``vision_model.`` or not) -> the open-clip names (the
    ``visual.*`` part of the original file; the unused projection head and text tower are not written)."""
    runtime = {k.removeprefix("vision_model."): v for k, v in state.items()}
    fused, parts = CLIP_FUSED_QKV
    merged: dict[str, torch.Tensor] = {}
    for key, value in runtime.items():
        if f".{parts[0]}." in key:
            pieces = [runtime[key.replace(f".{parts[0]}.", f".{p}.")] for p in parts]
            merged[key.replace(f".{parts[0]}.", f".{fused}.")] = torch.cat(pieces, dim=0)
        elif any(f".{p}." in key for p in parts[1:]):
            continue
        elif key in CLIP_ORIGINAL_SHAPES:
            merged[key] = value.reshape(1, *value.shape) if value.ndim == 2 else value.reshape(1, 1, -1)
        elif key == "embeddings.position_ids":
            continue
        else:
            merged[key] = value
    return remap_state_dict(merged, CLIP_ORIGINAL_KEYS.to_checkpoint())
