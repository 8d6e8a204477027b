"""The Wan 2.1 image-to-video image encoder: CLIP ViT-H/14, penultimate hidden states.

The ViT itself is transformers' ``CLIPVisionModel``; the preprocessing (resize of the shortest edge,
centre crop, rescale, normalise) is written here from the checkpoint's
``image_processor/preprocessor_config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The CLIP preprocessing settings of a checkpoint (``preprocessor_config.json``)."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = 3  # PIL bicubic

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        size = d.get("size", 224)
        shortest = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else int(size)
        crop = d.get("crop_size", 224)
        crop_h, crop_w = (
            (crop.get("height", 224), crop.get("width", 224)) if isinstance(crop, dict) else (crop, crop)
        )
        return cls(
            shortest_edge=int(shortest),
            crop_height=int(crop_h),
            crop_width=int(crop_w),
            do_resize=bool(d.get("do_resize", True)),
            do_center_crop=bool(d.get("do_center_crop", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_normalize=bool(d.get("do_normalize", True)),
            image_mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
            resample=int(d.get("resample", 3)),
        )


def clip_preprocess(images: list[np.ndarray], cfg: ImageProcessorConfig) -> torch.Tensor:
    """uint8 (H, W, 3) images -> pixel values (N, 3, crop_height, crop_width) float32."""
    out = []
    for array in images:
        image = Image.fromarray(array)
        if cfg.do_resize:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            image = image.resize(size, resample=Image.Resampling(cfg.resample))
        pixels = np.asarray(image)
        if cfg.do_center_crop:
            h, w = pixels.shape[:2]
            top, left = (h - cfg.crop_height) // 2, (w - cfg.crop_width) // 2
            if top < 0 or left < 0:
                raise ValueError(f"image of {w}x{h} is smaller than the CLIP crop after resizing")
            pixels = pixels[top : top + cfg.crop_height, left : left + cfg.crop_width]
        values = pixels.astype(np.float32)
        if cfg.do_rescale:
            values = values * np.float32(cfg.rescale_factor)
        if cfg.do_normalize:
            values = (values - np.array(cfg.image_mean, np.float32)) / np.array(cfg.image_std, np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1))))
    return torch.stack(out)


def build_clip_vision(config: dict[str, Any]) -> nn.Module:
    """transformers' CLIP vision tower, built on the meta device (the loader assigns the weights)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf_config = CLIPVisionConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    with torch.device("meta"):
        return CLIPVisionModel(hf_config)


class WanImageEncoder(nn.Module):
    """``forward(pixels (N, 3, S, S)) -> (N, tokens, hidden)``: CLIP's penultimate hidden states."""

    def __init__(self, vision: nn.Module):
        super().__init__()
        self.vision = vision

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vision.parameters()).dtype
        out = self.vision(pixel_values=pixels.to(dtype), output_hidden_states=True)
        return out.hidden_states[-2]
