"""Tiny random VACE checkpoints made with diffusers' own classes (``WanVACEPipeline``,
``WanVACETransformer3DModel``) and ``save_pretrained`` (offline), for the VACE tests.

The tokenizer, text encoder, VAE and scheduler are :mod:`tests.tiny`'s. The DiT is tiny (2 heads of 12,
4 blocks) with VACE blocks after blocks 0 and 2 (evenly spaced, as in the released models, so that a
single file's VACE layers can be inferred) and 96 control channels: the pipeline's control latents are
2 x 16 VAE channels plus the 8 x 8 mask channels of the tiny VAE (its spatial stride is 8), as for the
real models. ``two_experts`` adds a ``transformer_2`` and a ``boundary_ratio`` (the Wan 2.2 VACE-Fun
A14B layout, which diffusers' ``WanVACEPipeline`` takes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests import tiny

VACE_TRANSFORMER_KW: dict[str, Any] = {
    **tiny.TRANSFORMER_KW,
    "num_layers": 4,
    "vace_layers": [0, 2],
    "vace_in_channels": 96,
}


def make_vace_transformer(seed: int, **kw: Any):
    """A ``WanVACETransformer3DModel`` with every parameter re-drawn from a seeded normal."""
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(**{**VACE_TRANSFORMER_KW, **kw}).eval()
    tiny.randomize(model, seed, 0.2)
    return model


def make_vace_pipeline(
    *,
    scheduler: str = "unipc",
    flow_shift: float = 3.0,
    transformer_kw: dict[str, Any] | None = None,
    vae_kw: dict[str, Any] | None = None,
    two_experts: bool = False,
    boundary_ratio: float = 0.875,
    seed: int = 0,
):
    """A diffusers ``WanVACEPipeline`` with tiny random components (``two_experts``: also ``transformer_2``
    and ``boundary_ratio``)."""
    from diffusers import AutoencoderKLWan, WanVACEPipeline

    torch.manual_seed(seed)
    tokenizer = tiny.make_tokenizer()
    text_encoder = tiny.make_text_encoder(tokenizer)
    vae = AutoencoderKLWan(**{**tiny.VAE_KW, **(vae_kw or {})}).eval()
    tiny.randomize(vae, seed + 1, 0.3)
    kw = transformer_kw or {}
    transformer = make_vace_transformer(seed + 2, **kw)
    transformer_2 = make_vace_transformer(seed + 3, **kw) if two_experts else None
    return WanVACEPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=tiny.make_scheduler(scheduler, flow_shift),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio if two_experts else None,
    )


def save_vace_checkpoint(folder: Path, **kw: Any) -> Path:
    """Write a tiny VACE checkpoint in the diffusers layout into ``folder`` (``kw``: :func:`make_vace_pipeline`'s)."""
    make_vace_pipeline(**kw).save_pretrained(folder)
    return folder


def load_vace_reference(folder: Path, dtype: torch.dtype = torch.float32):
    """diffusers' ``WanVACEPipeline`` from a saved tiny checkpoint."""
    from diffusers import WanVACEPipeline

    pipe = WanVACEPipeline.from_pretrained(folder, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
