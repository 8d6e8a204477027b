"""Loading the CLIP image encoder (transformers' ``CLIPVisionModel``): its key map and the buffer that
checkpoints do not hold."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from wanpipe.weights.keymap import KeyMap, remap_state_dict


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
