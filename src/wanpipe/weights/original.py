"""Key maps of the original Wan repositories' checkpoints (Wan-Video/Wan2.1, Wan2.2), kept as data.

- DiT (``diffusion_pytorch_model*.safetensors`` next to a ``config.json`` with ``dim``/``num_heads``...):
  its names *are* wanpipe's runtime names, no table needed.
- VAE (``Wan2.1_VAE.pth``, also ComfyUI's ``wan_2.1_vae.safetensors``): ``wan/modules/vae.py`` names.
  The encoder and the decoder are flat ``nn.Sequential`` lists there (``downsamples.K``/``upsamples.K``);
  the decoder's flat index K maps to wanpipe's ``up_blocks.L.resnets.J`` / ``up_blocks.L.upsampler``
  by the VAE's shape, so that part of the table is generated per config by :func:`vae21_block_keys`.
- UMT5 encoder (``models_t5_umt5-xxl-enc-bf16.pth``): ``wan/modules/t5.py`` names -> transformers'
  ``UMT5EncoderModel`` names (:data:`T5_ORIGINAL_KEYS`).

Every table has its inverse for writing original-layout checkpoints (``wanpipe convert``).
"""

from __future__ import annotations

from wanpipe.weights.keymap import KeyMap

# -- UMT5 text encoder ------------------------------------------------------------------------------

_T5_BLOCK = r"blocks\.(\d+)\."
_HF_BLOCK = r"encoder.block.\1.layer."

T5_ORIGINAL_KEYS: KeyMap = (
    (r"token_embedding\.weight", r"shared.weight"),
    (_T5_BLOCK + r"norm1\.weight", _HF_BLOCK + r"0.layer_norm.weight"),
    (_T5_BLOCK + r"attn\.(q|k|v|o)\.weight", _HF_BLOCK + r"0.SelfAttention.\2.weight"),
    (
        _T5_BLOCK + r"pos_embedding\.embedding\.weight",
        _HF_BLOCK + r"0.SelfAttention.relative_attention_bias.weight",
    ),
    (_T5_BLOCK + r"norm2\.weight", _HF_BLOCK + r"1.layer_norm.weight"),
    (_T5_BLOCK + r"ffn\.gate\.0\.weight", _HF_BLOCK + r"1.DenseReluDense.wi_0.weight"),
    (_T5_BLOCK + r"ffn\.fc1\.weight", _HF_BLOCK + r"1.DenseReluDense.wi_1.weight"),
    (_T5_BLOCK + r"ffn\.fc2\.weight", _HF_BLOCK + r"1.DenseReluDense.wo.weight"),
    (r"norm\.weight", r"encoder.final_layer_norm.weight"),
)
"""``wan/modules/t5.py`` (``T5Encoder``, ``shared_pos=False``) -> transformers ``UMT5EncoderModel``."""

_HF_T5_BLOCK = r"encoder\.block\.(\d+)\.layer\."

T5_TO_ORIGINAL_KEYS: KeyMap = (
    (r"shared\.weight", r"token_embedding.weight"),
    (_HF_T5_BLOCK + r"0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    (_HF_T5_BLOCK + r"0\.SelfAttention\.(q|k|v|o)\.weight", r"blocks.\1.attn.\2.weight"),
    (
        _HF_T5_BLOCK + r"0\.SelfAttention\.relative_attention_bias\.weight",
        r"blocks.\1.pos_embedding.embedding.weight",
    ),
    (_HF_T5_BLOCK + r"1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (_HF_T5_BLOCK + r"1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
    (_HF_T5_BLOCK + r"1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (_HF_T5_BLOCK + r"1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
    (r"encoder\.final_layer_norm\.weight", r"norm.weight"),
)
"""The inverse table (``encoder.embed_tokens.weight``, tied to ``shared``, is not written)."""

# -- VAE (Wan 2.1) ----------------------------------------------------------------------------------

VAE21_ORIGINAL_KEYS: KeyMap = (
    # Inside a block: the original's residual nn.Sequential slots and resample slots.
    (r"(.+)\.residual\.0\.gamma", r"\1.norm1.gamma"),
    (r"(.+)\.residual\.2\.(weight|bias)", r"\1.conv1.\2"),
    (r"(.+)\.residual\.3\.gamma", r"\1.norm2.gamma"),
    (r"(.+)\.residual\.6\.(weight|bias)", r"\1.conv2.\2"),
    (r"(.+)\.shortcut\.(weight|bias)", r"\1.conv_shortcut.\2"),
    (r"(.+)\.resample\.1\.(weight|bias)", r"\1.conv.\2"),
)
"""Second pass: the original's names inside residual and resample blocks -> wanpipe's."""

VAE21_ORIGINAL_OUTER_KEYS: KeyMap = (
    (r"conv1\.(weight|bias)", r"quant_conv.\1"),
    (r"conv2\.(weight|bias)", r"post_quant_conv.\1"),
    (r"(encoder|decoder)\.conv1\.(weight|bias)", r"\1.conv_in.\2"),
    (r"(encoder|decoder)\.head\.0\.gamma", r"\1.norm_out.gamma"),
    (r"(encoder|decoder)\.head\.2\.(weight|bias)", r"\1.conv_out.\2"),
    (r"(encoder|decoder)\.middle\.0\.(.+)", r"\1.mid_block.resnets.0.\2"),
    (r"(encoder|decoder)\.middle\.1\.(.+)", r"\1.mid_block.attentions.0.\2"),
    (r"(encoder|decoder)\.middle\.2\.(.+)", r"\1.mid_block.resnets.1.\2"),
    (r"encoder\.downsamples\.(\d+)\.(.+)", r"encoder.down_blocks.\1.\2"),
)
"""First pass: top-level names (the encoder's flat list keeps its indices)."""


def vae21_block_keys(num_res_blocks: int, num_levels: int) -> KeyMap:
    """First-pass rules for the decoder's flat ``upsamples.K`` list of a Wan 2.1 VAE: each level has
    ``num_res_blocks + 1`` residual blocks, then (except the last level) one resample."""
    rules: list[tuple[str, str]] = []
    k = 0
    for level in range(num_levels):
        for j in range(num_res_blocks + 1):
            rules.append((rf"decoder\.upsamples\.{k}\.(.+)", rf"decoder.up_blocks.{level}.resnets.{j}.\1"))
            k += 1
        if level != num_levels - 1:
            rules.append((rf"decoder\.upsamples\.{k}\.(.+)", rf"decoder.up_blocks.{level}.upsampler.\1"))
            k += 1
    return tuple(rules)


def vae21_original_tables(num_res_blocks: int, num_levels: int) -> tuple[KeyMap, KeyMap]:
    """The two passes (outer block names, then names inside blocks) for a VAE of this shape."""
    return VAE21_ORIGINAL_OUTER_KEYS + vae21_block_keys(num_res_blocks, num_levels), VAE21_ORIGINAL_KEYS


VAE21_TO_ORIGINAL_INNER_KEYS: KeyMap = (
    (r"(.+)\.norm1\.gamma", r"\1.residual.0.gamma"),
    (r"(.+)\.conv1\.(weight|bias)", r"\1.residual.2.\2"),
    (r"(.+)\.norm2\.gamma", r"\1.residual.3.gamma"),
    (r"(.+)\.conv2\.(weight|bias)", r"\1.residual.6.\2"),
    (r"(.+)\.conv_shortcut\.(weight|bias)", r"\1.shortcut.\2"),
    (r"(.+\.(?:down_blocks\.\d+|upsampler))\.conv\.(weight|bias)", r"\1.resample.1.\2"),
)
"""Inverse of :data:`VAE21_ORIGINAL_KEYS` (wanpipe names, first pass when writing)."""


def vae21_to_original_tables(num_res_blocks: int, num_levels: int) -> tuple[KeyMap, KeyMap]:
    """wanpipe names -> original names: inner names first, then the outer block names."""
    outer: list[tuple[str, str]] = [
        (r"quant_conv\.(weight|bias)", r"conv1.\1"),
        (r"post_quant_conv\.(weight|bias)", r"conv2.\1"),
        (r"(encoder|decoder)\.conv_in\.(weight|bias)", r"\1.conv1.\2"),
        (r"(encoder|decoder)\.norm_out\.gamma", r"\1.head.0.gamma"),
        (r"(encoder|decoder)\.conv_out\.(weight|bias)", r"\1.head.2.\2"),
        (r"(encoder|decoder)\.mid_block\.resnets\.0\.(.+)", r"\1.middle.0.\2"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", r"\1.middle.1.\2"),
        (r"(encoder|decoder)\.mid_block\.resnets\.1\.(.+)", r"\1.middle.2.\2"),
        (r"encoder\.down_blocks\.(\d+)\.(.+)", r"encoder.downsamples.\1.\2"),
    ]
    k = 0
    for level in range(num_levels):
        for j in range(num_res_blocks + 1):
            outer.append((rf"decoder\.up_blocks\.{level}\.resnets\.{j}\.(.+)", rf"decoder.upsamples.{k}.\1"))
            k += 1
        if level != num_levels - 1:
            outer.append((rf"decoder\.up_blocks\.{level}\.upsampler\.(.+)", rf"decoder.upsamples.{k}.\1"))
            k += 1
    return VAE21_TO_ORIGINAL_INNER_KEYS, tuple(outer)


# -- The original repositories' file names ----------------------------------------------------------

ORIGINAL_T5_FILES: tuple[str, ...] = (
    "models_t5_umt5-xxl-enc-bf16.pth",
    "models_t5_umt5-xxl-enc-bf16.safetensors",
)
ORIGINAL_VAE_FILES: tuple[str, ...] = ("Wan2.1_VAE.pth", "Wan2.1_VAE.safetensors", "Wan2.2_VAE.pth")
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
}
"""Scheduler shift and expert boundary of each variant in the original repositories."""
