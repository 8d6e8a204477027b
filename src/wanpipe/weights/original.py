"""Key maps of the original Wan repositories' checkpoints (Wan-Video/Wan2.1, Wan2.2), kept as data.

- DiT (``diffusion_pytorch_model*.safetensors`` next to a ``config.json`` with ``dim``/``num_heads``...):
  its names *are* wanpipe's runtime names, no table needed.
- VAE (``Wan2.1_VAE.pth``, also ComfyUI's ``wan_2.1_vae.safetensors``): ``wan/modules/vae.py`` names.
  The encoder and the decoder are flat ``nn.Sequential`` lists there (``downsamples.K``/``upsamples.K``);
  the decoder's flat index K maps to wanpipe's ``up_blocks.L.resnets.J`` / ``up_blocks.L.upsampler``
  by the VAE's shape, so that part of the table is generated per config by :func:`vae21_decoder_keys`.
- UMT5 encoder (``models_t5_umt5-xxl-enc-bf16.pth``): ``wan/modules/t5.py`` names -> transformers'
  ``UMT5EncoderModel`` names (:data:`T5_KEYS`).

Each table is written once (:class:`~wanpipe.weights.keymap.KeyTable`, original name first); the way
back, for writing original-layout checkpoints (``wanpipe convert``), is derived from it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from wanpipe.config import SamplingDefaults, WanVariant
from wanpipe.weights.keymap import KeyMap, KeyTable
from wanpipe.weights.vae_keys import RESAMPLE_CONV

# -- UMT5 text encoder ------------------------------------------------------------------------------

T5_KEYS = KeyTable(
    (
        ("token_embedding.weight", "shared.weight"),
        ("blocks.{n}.norm1.weight", "encoder.block.{n}.layer.0.layer_norm.weight"),
        ("blocks.{n}.attn.{qkvo}.weight", "encoder.block.{n}.layer.0.SelfAttention.{qkvo}.weight"),
        (
            "blocks.{n}.pos_embedding.embedding.weight",
            "encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        ("blocks.{n}.norm2.weight", "encoder.block.{n}.layer.1.layer_norm.weight"),
        ("blocks.{n}.ffn.gate.0.weight", "encoder.block.{n}.layer.1.DenseReluDense.wi_0.weight"),
        ("blocks.{n}.ffn.fc1.weight", "encoder.block.{n}.layer.1.DenseReluDense.wi_1.weight"),
        ("blocks.{n}.ffn.fc2.weight", "encoder.block.{n}.layer.1.DenseReluDense.wo.weight"),
        ("norm.weight", "encoder.final_layer_norm.weight"),
    ),
    fields={"qkvo": "q|k|v|o"},
)
"""``(wan/modules/t5.py, transformers)`` names: ``T5Encoder`` (``shared_pos=False``) and
``UMT5EncoderModel``. transformers' ``encoder.embed_tokens.weight`` is tied to ``shared.weight``
(``text_encoder_keys.TEXT_ENCODER_ALIASES``): no rule names it, and writers leave it out."""

T5_ORIGINAL_KEYS: KeyMap = T5_KEYS.to_runtime()
"""Original names -> transformers names (reading)."""

T5_TO_ORIGINAL_KEYS: KeyMap = T5_KEYS.to_checkpoint()
"""transformers names -> original names (writing; without the tied ``encoder.embed_tokens.weight``)."""

# -- VAE (Wan 2.1) ----------------------------------------------------------------------------------

VAE21_INNER_KEYS = KeyTable(
    (
        ("{rest}.residual.0.gamma", "{rest}.norm1.gamma"),
        ("{rest}.residual.2.{wb}", "{rest}.conv1.{wb}"),
        ("{rest}.residual.3.gamma", "{rest}.norm2.gamma"),
        ("{rest}.residual.6.{wb}", "{rest}.conv2.{wb}"),
        ("{rest}.shortcut.{wb}", "{rest}.conv_shortcut.{wb}"),
        RESAMPLE_CONV,
    )
)
"""Names inside residual and resample blocks: the original's ``nn.Sequential`` slots -> wanpipe's."""

VAE_TOP_KEYS = KeyTable(
    (
        ("conv1.{wb}", "quant_conv.{wb}"),
        ("conv2.{wb}", "post_quant_conv.{wb}"),
        ("{side}.conv1.{wb}", "{side}.conv_in.{wb}"),
        ("{side}.head.0.gamma", "{side}.norm_out.gamma"),
        ("{side}.head.2.{wb}", "{side}.conv_out.{wb}"),
        ("{side}.middle.0.{rest}", "{side}.mid_block.resnets.0.{rest}"),
        ("{side}.middle.1.{rest}", "{side}.mid_block.attentions.0.{rest}"),
        ("{side}.middle.2.{rest}", "{side}.mid_block.resnets.1.{rest}"),
    ),
    fields={"side": "encoder|decoder"},
)
"""Top-level names of both original VAEs (``vae.py`` / ``vae2_1.py`` and ``vae2_2.py``)."""

VAE21_OUTER_KEYS = VAE_TOP_KEYS + KeyTable(
    (("encoder.downsamples.{n}.{rest}", "encoder.down_blocks.{n}.{rest}"),)
)
"""Top-level names, and the blocks of the Wan 2.1 encoder (its flat list keeps its indices)."""


def vae21_decoder_keys(num_res_blocks: int, num_levels: int) -> KeyTable:
    """The decoder's flat ``upsamples.K`` list of a Wan 2.1 VAE: each level has ``num_res_blocks + 1``
    residual blocks, then (except the last level) one resample."""
    rules: list[tuple[str, str]] = []
    k = 0
    for level in range(num_levels):
        for j in range(num_res_blocks + 1):
            rules.append(
                (f"decoder.upsamples.{k}.{{rest}}", f"decoder.up_blocks.{level}.resnets.{j}.{{rest}}")
            )
            k += 1
        if level != num_levels - 1:
            rules.append((f"decoder.upsamples.{k}.{{rest}}", f"decoder.up_blocks.{level}.upsampler.{{rest}}"))
            k += 1
    return KeyTable(tuple(rules))


def vae21_original_tables(num_res_blocks: int, num_levels: int) -> tuple[KeyMap, KeyMap]:
    """Original names -> wanpipe names in two passes: the block names (outer), then names inside blocks."""
    outer = VAE21_OUTER_KEYS + vae21_decoder_keys(num_res_blocks, num_levels)
    return outer.to_runtime(), VAE21_INNER_KEYS.to_runtime()


def vae22_block_keys(num_res_blocks: int, num_levels: int) -> KeyTable:
    """The blocks of Wan 2.2's VAE (``vae2_2.py``): level i of the encoder is
    ``downsamples.i.downsamples.J`` (``num_res_blocks`` residual blocks, then the resample but at the last
    level), of the decoder ``upsamples.i.upsamples.J`` (``num_res_blocks + 1`` residual blocks, then the
    resample but at the last level); wanpipe's (= diffusers') ``down_blocks.i.resnets.J`` /
    ``downsampler`` and ``up_blocks.i.resnets.J`` / ``upsampler``."""
    rules: list[tuple[str, str]] = []
    last = num_levels - 1
    for i in range(num_levels):
        enc, dec = f"encoder.downsamples.{i}.downsamples", f"decoder.upsamples.{i}.upsamples"
        rules += [
            (f"{enc}.{j}.{{rest}}", f"encoder.down_blocks.{i}.resnets.{j}.{{rest}}")
            for j in range(num_res_blocks)
        ]
        if i != last:
            rules.append(
                (f"{enc}.{num_res_blocks}.{{rest}}", f"encoder.down_blocks.{i}.downsampler.{{rest}}")
            )
        rules += [
            (f"{dec}.{j}.{{rest}}", f"decoder.up_blocks.{i}.resnets.{j}.{{rest}}")
            for j in range(num_res_blocks + 1)
        ]
        if i != last:
            rules.append(
                (f"{dec}.{num_res_blocks + 1}.{{rest}}", f"decoder.up_blocks.{i}.upsampler.{{rest}}")
            )
    return KeyTable(tuple(rules))


def vae22_original_tables(num_res_blocks: int, num_levels: int) -> tuple[KeyMap, KeyMap]:
    """Wan 2.2 VAE, original names -> wanpipe names: (outer, inner) applied in that order."""
    outer = VAE_TOP_KEYS + vae22_block_keys(num_res_blocks, num_levels)
    return outer.to_runtime(), VAE21_INNER_KEYS.to_runtime()


def vae22_to_original_tables(num_res_blocks: int, num_levels: int) -> tuple[KeyMap, KeyMap]:
    """wanpipe names -> Wan 2.2 original names: (inner, outer) applied in that order."""
    outer = VAE_TOP_KEYS + vae22_block_keys(num_res_blocks, num_levels)
    return VAE21_INNER_KEYS.to_checkpoint(), outer.to_checkpoint()


def vae21_to_original_tables(num_res_blocks: int, num_levels: int) -> tuple[KeyMap, KeyMap]:
    """wanpipe names -> original names: the two passes undone in reverse order (inner, then outer)."""
    outer = VAE21_OUTER_KEYS + vae21_decoder_keys(num_res_blocks, num_levels)
    return VAE21_INNER_KEYS.to_checkpoint(), outer.to_checkpoint()


# -- The original repositories' file names ----------------------------------------------------------

ORIGINAL_T5_FILES: tuple[str, ...] = (
    "models_t5_umt5-xxl-enc-bf16.pth",
    "models_t5_umt5-xxl-enc-bf16.safetensors",
)
ORIGINAL_VAE_FILES: tuple[str, ...] = ("Wan2.1_VAE.pth", "Wan2.1_VAE.safetensors", "Wan2.2_VAE.pth")
ORIGINAL_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
"""Wan 2.1 I2V / FLF2V's image encoder (open-clip XLM-RoBERTa ViT-H/14; only its vision tower is used)."""
ORIGINAL_TOKENIZER_DIRS: tuple[str, ...] = ("google/umt5-xxl", "umt5-xxl", "tokenizer")
ORIGINAL_EXPERT_DIRS: tuple[str, str] = ("high_noise_model", "low_noise_model")
UMT5_XXL_TOKENIZER_ID = "google/umt5-xxl"
"""The hub id the original code loads its tokenizer from (``wan/modules/t5.py``)."""

ORIGINAL_SAMPLING: dict[str, dict[str, float]] = {
    # The original repositories' generate.py / configs: sample_shift and the A14B boundary.
    "wan2.1-t2v-1.3b": {"flow_shift": 5.0},
    "wan2.1-t2v-14b": {"flow_shift": 5.0},
    "wan2.1-i2v-14b": {"flow_shift": 5.0},
    "wan2.1-flf2v-14b": {"flow_shift": 16.0},
    "wan2.2-t2v-a14b": {"flow_shift": 12.0, "boundary_ratio": 0.875},
    "wan2.2-i2v-a14b": {"flow_shift": 5.0, "boundary_ratio": 0.900},
    "wan2.2-ti2v-5b": {"flow_shift": 5.0},
    "wan2.1-vace-1.3b": {"flow_shift": 16.0},
    "wan2.1-vace-14b": {"flow_shift": 16.0},
    # Wan 2.2 VACE-Fun A14B (alibaba-pai, built on T2V-A14B): T2V-A14B's settings.
    "wan2.2-vace-fun-a14b": {"flow_shift": 12.0, "boundary_ratio": 0.875},
    # wan/configs/wan_animate_14B.py: sample_shift 5.0.
    "wan2.2-animate-14b": {"flow_shift": 5.0},
}
"""Scheduler shift and expert boundary of each variant in the original repositories."""


ORIGINAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""``wan/configs/shared_config.py``'s ``sample_neg_prompt`` (the same in Wan2.1 and Wan2.2): what the
original pipelines use when the negative prompt is empty (``if n_prompt == "": n_prompt = ...``)."""

ORIGINAL_DEFAULTS: dict[str, dict[str, Any]] = {
    # Wan2.1 generate.py (Wan-Video/Wan2.1 9737cba): steps 50, 40 when "i2v" is in the task name (so not
    # flf2v); --sample_guide_scale 5.0; shift 5.0, 3.0 for i2v at --size 832*480 / 480*832 (its max
    # area), 16 for flf2v and vace (ORIGINAL_SAMPLING); 81 frames; configs: sample_fps 16, the shared
    # negative prompt, i2v_14B's with "镜头晃动，" before it, flf2v_14B's with "镜头切换，" before i2v's.
    "wan2.1-t2v-1.3b": dict(num_inference_steps=50, guidance_scale=5.0, num_frames=81, fps=16),
    "wan2.1-t2v-14b": dict(num_inference_steps=50, guidance_scale=5.0, num_frames=81, fps=16),
    "wan2.1-i2v-14b": dict(
        num_inference_steps=40,
        guidance_scale=5.0,
        num_frames=81,
        fps=16,
        negative_prompt="镜头晃动，" + ORIGINAL_NEGATIVE_PROMPT,
        flow_shift_480p=3.0,
    ),
    "wan2.1-flf2v-14b": dict(
        num_inference_steps=50,
        guidance_scale=5.0,
        num_frames=81,
        fps=16,
        negative_prompt="镜头切换，镜头晃动，" + ORIGINAL_NEGATIVE_PROMPT,
    ),
    "wan2.1-vace-1.3b": dict(num_inference_steps=50, guidance_scale=5.0, num_frames=81, fps=16),
    "wan2.1-vace-14b": dict(num_inference_steps=50, guidance_scale=5.0, num_frames=81, fps=16),
    # Wan2.2 generate.py: the config's sample_steps, sample_guide_scale ((low noise, high noise) for the
    # A14B experts), frame_num, sample_fps (wan/configs/wan_*.py); shared negative prompt.
    "wan2.2-t2v-a14b": dict(
        num_inference_steps=40, guidance_scale=4.0, guidance_scale_2=3.0, num_frames=81, fps=16
    ),
    "wan2.2-i2v-a14b": dict(
        num_inference_steps=40, guidance_scale=3.5, guidance_scale_2=3.5, num_frames=81, fps=16
    ),
    "wan2.2-ti2v-5b": dict(num_inference_steps=50, guidance_scale=5.0, num_frames=121, fps=24),
    "wan2.2-animate-14b": dict(num_inference_steps=20, guidance_scale=1.0, num_frames=77, fps=30),
    # VACE-Fun A14B (alibaba-pai) on T2V-A14B: T2V-A14B's.
    "wan2.2-vace-fun-a14b": dict(
        num_inference_steps=40, guidance_scale=4.0, guidance_scale_2=3.0, num_frames=81, fps=16
    ),
}
"""What the original scripts give a request that leaves a value out, per variant (the negative prompt is
:data:`ORIGINAL_NEGATIVE_PROMPT` unless named; ``flow_shift_480p``: the shift at 480P areas). Original
folders take these (:func:`original_sampling_defaults`); diffusers folders keep the variant's."""


def original_sampling_defaults(variant: WanVariant) -> SamplingDefaults:
    """The variant's defaults with the original scripts' values (:data:`ORIGINAL_DEFAULTS`) over them."""
    values = ORIGINAL_DEFAULTS.get(variant.name)
    if values is None:
        return variant.defaults
    return replace(variant.defaults, **{"negative_prompt": ORIGINAL_NEGATIVE_PROMPT, **values})
