"""Tiny random Wan2.2-Animate checkpoints made with diffusers' own classes (``WanAnimatePipeline``,
``WanAnimateTransformer3DModel``) and ``save_pretrained`` (offline), for the Animate tests.

The tokenizer, text encoder, VAE and scheduler are :mod:`tests.tiny`'s, the CLIP image encoder and its
processor :mod:`tests.tiny_family`'s (as for Wan 2.1 I2V). The DiT is tiny (2 heads of 12, 4 blocks, a
face adapter block after blocks 0 and 2) and takes 36 input channels (16 noise + 16 reference / previous
segment + 4 mask channels, as the released model) with CLIP image tokens through the added key/value
projections; its motion encoder reads 16 x 16 face frames (two residual levels) and encodes 3 frames per
call, so that the batched encoding is exercised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests import tiny, tiny_family

ANIMATE_TRANSFORMER_KW: dict[str, Any] = {
    **tiny.TRANSFORMER_KW,
    "num_layers": 4,
    "in_channels": 36,
    "latent_channels": 16,
    "out_channels": 16,
    "image_dim": tiny_family.CLIP_KW["hidden_size"],
    "added_kv_proj_dim": tiny_family.DIT_DIM,
    "motion_encoder_channel_sizes": {"4": 8, "8": 6, "16": 4},
    "motion_encoder_size": 16,
    "motion_style_dim": 8,
    "motion_dim": 4,
    "motion_encoder_dim": 8,
    "face_encoder_hidden_dim": 6,
    "face_encoder_num_heads": 2,
    "inject_face_latents_blocks": 2,
    "motion_encoder_batch_size": 3,
}
"""``WanAnimateTransformer3DModel`` keyword arguments of the tiny Animate DiT."""

FACE_SIZE = ANIMATE_TRANSFORMER_KW["motion_encoder_size"]


def make_animate_transformer(seed: int, **kw: Any):
    """A ``WanAnimateTransformer3DModel`` with every parameter re-drawn from a seeded normal (the motion
    encoder's at scale 1: its equalized-learning-rate layers scale their weights down themselves)."""
    from diffusers import WanAnimateTransformer3DModel

    model = WanAnimateTransformer3DModel(**{**ANIMATE_TRANSFORMER_KW, **kw}).eval()
    tiny.randomize(model, seed, 0.2)
    tiny.randomize(model.motion_encoder, seed + 1000, 1.0)
    return model


def make_animate_pipeline(
    *,
    scheduler: str = "unipc",
    flow_shift: float = 3.0,
    transformer_kw: dict[str, Any] | None = None,
    seed: int = 0,
):
    """A diffusers ``WanAnimatePipeline`` with tiny random components."""
    from diffusers import WanAnimatePipeline

    torch.manual_seed(seed)
    tokenizer, text_encoder = tiny_family.text_side(seed)
    image_encoder, image_processor = tiny_family.clip(seed + 4)
    pipe = WanAnimatePipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_family.vae(seed + 1),
        scheduler=tiny.make_scheduler(scheduler, flow_shift),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=make_animate_transformer(seed + 2, **(transformer_kw or {})),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_animate_checkpoint(folder: Path, **kw: Any) -> Path:
    """Write a tiny Animate checkpoint in the diffusers layout into ``folder`` (``kw``:
    :func:`make_animate_pipeline`'s) and return ``folder``."""
    make_animate_pipeline(**kw).save_pretrained(folder)
    return folder


def load_animate_reference(folder: Path, dtype: torch.dtype = torch.float32):
    """diffusers' ``WanAnimatePipeline`` from a saved tiny checkpoint."""
    from diffusers import WanAnimatePipeline

    pipe = WanAnimatePipeline.from_pretrained(folder, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
