"""Tiny random checkpoints of the whole Wan family, made with diffusers' own classes (offline).

Every builder returns the diffusers pipeline it saved, so a test can use it as the reference:

- ``t2v_a14b``: Wan 2.2 T2V A14B, ``WanPipeline`` with ``transformer_2`` and ``boundary_ratio=0.875``
- ``ti2v_5b``: Wan 2.2 TI2V-5B, ``WanPipeline(expand_timesteps=True)`` with a 48-channel Wan 2.2 VAE
  (its image-to-video reference is :func:`ti2v_i2v_reference`, built from the same components)
- ``i2v_14b``: Wan 2.1 I2V, ``WanImageToVideoPipeline`` with a tiny CLIP vision tower
- ``flf2v_14b``: the same with ``pos_embed_seq_len`` (first-last-frame)
- ``i2v_a14b``: Wan 2.2 I2V A14B, ``WanImageToVideoPipeline`` without image encoder, two experts

All weights (text encoder, CLIP, VAE, transformers) are re-drawn from seeded normals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests import tiny

# The tiny transformer's width: num_attention_heads * attention_head_dim.
DIT_DIM = tiny.TRANSFORMER_KW["num_attention_heads"] * tiny.TRANSFORMER_KW["attention_head_dim"]

CLIP_KW: dict[str, Any] = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    projection_dim=16,
    hidden_act="gelu",  # as in the published Wan 2.1 I2V image encoder (open-clip ViT-H/14)
)
# class token + (32 / 8) ** 2 patches
CLIP_TOKENS = 1 + (CLIP_KW["image_size"] // CLIP_KW["patch_size"]) ** 2

Z48 = 48
VAE22_KW: dict[str, Any] = dict(
    base_dim=8,
    decoder_base_dim=12,
    z_dim=Z48,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    is_residual=True,
    patch_size=2,
    in_channels=12,
    out_channels=12,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[round(0.3 * float(np.sin(1.7 * i)), 4) for i in range(Z48)],
    latents_std=[round(0.6 + 0.05 * i, 4) for i in range(Z48)],
)

I2V_TRANSFORMER_KW: dict[str, Any] = dict(in_channels=36, out_channels=16)
I2V21_TRANSFORMER_KW: dict[str, Any] = dict(
    in_channels=36, out_channels=16, image_dim=CLIP_KW["hidden_size"], added_kv_proj_dim=DIT_DIM
)
FLF2V_TRANSFORMER_KW: dict[str, Any] = dict(I2V21_TRANSFORMER_KW, pos_embed_seq_len=2 * CLIP_TOKENS)
TI2V_TRANSFORMER_KW: dict[str, Any] = dict(in_channels=Z48, out_channels=Z48)


def text_side(seed: int):
    tokenizer = tiny.make_tokenizer()
    text_encoder = tiny.make_text_encoder(tokenizer)
    tiny.randomize(text_encoder, seed, 0.2)
    return tokenizer, text_encoder


def scheduler(kind: str = "unipc", flow_shift: float = 3.0):
    return tiny.make_scheduler(kind, flow_shift)


def vae(seed: int, wan22: bool = False):
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(**(VAE22_KW if wan22 else tiny.VAE_KW)).eval()
    tiny.randomize(model, seed, 0.3)
    return model


def transformer(seed: int, **kw: Any):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**{**tiny.TRANSFORMER_KW, **kw}).eval()
    tiny.randomize(model, seed, 0.2)
    return model


def clip(seed: int):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(CLIPVisionConfig(**CLIP_KW)).eval()
    tiny.randomize(encoder, seed, 0.2)
    processor = CLIPImageProcessor(
        crop_size={"height": CLIP_KW["image_size"], "width": CLIP_KW["image_size"]},
        size={"shortest_edge": CLIP_KW["image_size"]},
        do_center_crop=True,
        do_resize=True,
        resample=3,
    )
    return encoder, processor


def _save(pipe, folder: Path):
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t2v_a14b(folder: Path, seed: int = 100):
    """Wan 2.2 T2V A14B: a high-noise ``transformer`` and a low-noise ``transformer_2``."""
    from diffusers import WanPipeline

    tokenizer, text_encoder = text_side(seed)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae(seed + 1),
        scheduler=scheduler("unipc", 3.0),
        transformer=transformer(seed + 2),
        transformer_2=transformer(seed + 3),
        boundary_ratio=0.875,
    )
    return _save(pipe, folder)


def ti2v_5b(folder: Path, seed: int = 200):
    """Wan 2.2 TI2V-5B: 48-channel Wan 2.2 VAE (16x spatial), per-token timesteps."""
    from diffusers import WanPipeline

    tokenizer, text_encoder = text_side(seed)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae(seed + 1, wan22=True),
        scheduler=scheduler("unipc", 5.0),
        transformer=transformer(seed + 2, **TI2V_TRANSFORMER_KW),
        expand_timesteps=True,
    )
    return _save(pipe, folder)


def ti2v_i2v_reference(t2v_pipe):
    """diffusers' image-to-video pipeline over the TI2V-5B components (no image encoder)."""
    from diffusers import WanImageToVideoPipeline

    c = t2v_pipe.components
    pipe = WanImageToVideoPipeline(
        tokenizer=c["tokenizer"],
        text_encoder=c["text_encoder"],
        vae=c["vae"],
        scheduler=type(c["scheduler"]).from_config(c["scheduler"].config),
        transformer=c["transformer"],
        image_encoder=None,
        image_processor=None,
        expand_timesteps=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def i2v_14b(folder: Path, seed: int = 300, *, flf2v: bool = False):
    """Wan 2.1 I2V (CLIP image tokens through added k/v); ``flf2v=True`` adds the first-last pos_embed."""
    from diffusers import WanImageToVideoPipeline

    tokenizer, text_encoder = text_side(seed)
    image_encoder, image_processor = clip(seed + 4)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae(seed + 1),
        scheduler=scheduler("euler" if flf2v else "unipc", 5.0 if flf2v else 3.0),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer(seed + 2, **(FLF2V_TRANSFORMER_KW if flf2v else I2V21_TRANSFORMER_KW)),
    )
    return _save(pipe, folder)


def i2v_a14b(folder: Path, seed: int = 500):
    """Wan 2.2 I2V A14B: two 36-channel experts, no image encoder, ``boundary_ratio=0.9``."""
    from diffusers import WanImageToVideoPipeline

    tokenizer, text_encoder = text_side(seed)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae(seed + 1),
        scheduler=scheduler("unipc", 5.0),
        image_processor=None,
        image_encoder=None,
        transformer=transformer(seed + 2, **I2V_TRANSFORMER_KW),
        transformer_2=transformer(seed + 3, **I2V_TRANSFORMER_KW),
        boundary_ratio=0.9,
    )
    return _save(pipe, folder)


def v2v_reference(t2v_pipe):
    """diffusers' ``WanVideoToVideoPipeline`` over a T2V pipeline's components (fresh scheduler)."""
    from diffusers import WanVideoToVideoPipeline

    c = t2v_pipe.components
    pipe = WanVideoToVideoPipeline(
        tokenizer=c["tokenizer"],
        text_encoder=c["text_encoder"],
        transformer=c["transformer"],
        vae=c["vae"],
        scheduler=type(c["scheduler"]).from_config(c["scheduler"].config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random uint8 (H, W, 3) picture: a few sinusoids plus a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fy, fx, ph = rng.uniform(0.05, 0.4, 2).tolist() + [rng.uniform(0, 6.3)]
        out[..., c] = 0.5 + 0.4 * np.sin(fy * y + fx * x + ph)
    out += rng.normal(0, 0.05, out.shape).astype(np.float32)
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def pil_picture(height: int, width: int, seed: int):
    from PIL import Image

    return Image.fromarray(picture(height, width, seed))


def pil_video(num_frames: int, height: int, width: int, seed: int):
    """``num_frames`` PIL frames of a picture sliding right by one pixel per frame."""
    from PIL import Image

    base = picture(height, width + num_frames, seed)
    return [Image.fromarray(np.ascontiguousarray(base[:, i : i + width])) for i in range(num_frames)]
