"""Tiny random Wan checkpoints made with diffusers' own classes and ``save_pretrained`` (offline).

The tokenizer is a ``tokenizers`` Unigram model trained on a few sentences, wrapped in transformers'
``T5TokenizerFast``; the text encoder a small ``UMT5EncoderModel``. Every parameter is re-drawn from a
seeded normal so that no weight is trivially zero or one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SENTENCES = [
    "a cat walks on the grass",
    "a dog runs in the park under the sun",
    "the quick brown fox jumps over the lazy dog",
    "video of a red car driving on a road at night",
    "bright tones, overexposed, static, blurred details, worst quality",
    "an astronaut rides a horse on the moon, cinematic",
]

TRANSFORMER_KW: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=16,
    freq_dim=8,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)

VAE_KW: dict[str, Any] = dict(
    base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
)


def make_tokenizer():
    from transformers import T5TokenizerFast

    from wanpipe.demo import train_tokenizer

    tok = train_tokenizer(SENTENCES * 10, vocab_size=96)
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim == 1 and "norm" in _ else 0.0))


def make_text_encoder(tokenizer):
    """A small UMT5 encoder for ``tokenizer`` (default init; callers may re-randomise it)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    return UMT5EncoderModel(config).eval()


def make_scheduler(kind: str = "unipc", flow_shift: float = 3.0):
    """The Wan checkpoints' flow UniPC scheduler, or flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=flow_shift,
            num_train_timesteps=1000,
        )
    return FlowMatchEulerDiscreteScheduler(shift=flow_shift)


def make_pipeline(
    *,
    scheduler: str = "unipc",
    flow_shift: float = 3.0,
    transformer_kw: dict[str, Any] | None = None,
    vae_kw: dict[str, Any] | None = None,
    seed: int = 0,
):
    """A diffusers ``WanPipeline`` with tiny random components."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    text_encoder = make_text_encoder(tokenizer)
    vae = AutoencoderKLWan(**{**VAE_KW, **(vae_kw or {})}).eval()
    transformer = WanTransformer3DModel(**{**TRANSFORMER_KW, **(transformer_kw or {})}).eval()
    randomize(vae, seed + 1, 0.3)
    randomize(transformer, seed + 2, 0.2)
    sched = make_scheduler(scheduler, flow_shift)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=sched, transformer=transformer
    )


def save_checkpoint(folder: Path, *, max_shard_size: str | None = None, **kw: Any) -> Path:
    """Write a tiny checkpoint in the diffusers layout into ``folder``."""
    pipe = make_pipeline(**kw)
    if max_shard_size is None:
        pipe.save_pretrained(folder)
    else:
        pipe.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def load_reference(folder: Path, dtype: torch.dtype = torch.float32):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
