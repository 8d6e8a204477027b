"""Key maps for the Wan DiT: diffusers checkpoint names -> wanpipe module names.

wanpipe's runtime names are those of the original Wan repositories (Wan-Video/Wan2.1
``wan/modules/model.py``), so an original-format checkpoint needs no renaming and a diffusers
checkpoint (``Wan-AI/<name>-Diffusers``, ``transformer/``) goes through the table below.
Each rule matches a whole key; ``(\\w+)`` at the end carries ``weight`` / ``bias`` over.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from wanpipe.weights.keymap import KeyMap, remap_state_dict

T = TypeVar("T")

_BLOCK = r"blocks\.(\d+)\."

TRANSFORMER_DIFFUSERS_KEYS: KeyMap = (
    # Condition embedders.
    (r"condition_embedder\.time_embedder\.linear_1\.(\w+)", r"time_embedding.0.\1"),
    (r"condition_embedder\.time_embedder\.linear_2\.(\w+)", r"time_embedding.2.\1"),
    (r"condition_embedder\.time_proj\.(\w+)", r"time_projection.1.\1"),
    (r"condition_embedder\.text_embedder\.linear_1\.(\w+)", r"text_embedding.0.\1"),
    (r"condition_embedder\.text_embedder\.linear_2\.(\w+)", r"text_embedding.2.\1"),
    # CLIP image projection (I2V / FLF2V).
    (r"condition_embedder\.image_embedder\.norm1\.(\w+)", r"img_emb.proj.0.\1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.(\w+)", r"img_emb.proj.1.\1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.(\w+)", r"img_emb.proj.3.\1"),
    (r"condition_embedder\.image_embedder\.norm2\.(\w+)", r"img_emb.proj.4.\1"),
    (r"condition_embedder\.image_embedder\.pos_embed", r"img_emb.emb_pos"),
    # Self-attention.
    (_BLOCK + r"attn1\.to_(q|k|v)\.(\w+)", r"blocks.\1.self_attn.\2.\3"),
    (_BLOCK + r"attn1\.to_out\.0\.(\w+)", r"blocks.\1.self_attn.o.\2"),
    (_BLOCK + r"attn1\.norm_(q|k)\.(\w+)", r"blocks.\1.self_attn.norm_\2.\3"),
    # Cross-attention (text, plus the image key/value branch of I2V).
    (_BLOCK + r"attn2\.to_(q|k|v)\.(\w+)", r"blocks.\1.cross_attn.\2.\3"),
    (_BLOCK + r"attn2\.to_out\.0\.(\w+)", r"blocks.\1.cross_attn.o.\2"),
    (_BLOCK + r"attn2\.norm_(q|k)\.(\w+)", r"blocks.\1.cross_attn.norm_\2.\3"),
    (_BLOCK + r"attn2\.add_(k|v)_proj\.(\w+)", r"blocks.\1.cross_attn.\2_img.\3"),
    (_BLOCK + r"attn2\.norm_added_k\.(\w+)", r"blocks.\1.cross_attn.norm_k_img.\2"),
    # Block norms, feed-forward and modulation. diffusers' norm2 (the affine cross-attention norm)
    # is the original's norm3; the two affine-free norms carry no parameters.
    (_BLOCK + r"norm2\.(\w+)", r"blocks.\1.norm3.\2"),
    (_BLOCK + r"ffn\.net\.0\.proj\.(\w+)", r"blocks.\1.ffn.0.\2"),
    (_BLOCK + r"ffn\.net\.2\.(\w+)", r"blocks.\1.ffn.2.\2"),
    (_BLOCK + r"scale_shift_table", r"blocks.\1.modulation"),
    # Output head.
    (r"scale_shift_table", r"head.modulation"),
    (r"proj_out\.(\w+)", r"head.head.\1"),
)
"""Ordered ``(pattern, replacement)`` rules; ``patch_embedding.*`` keeps its name."""

TRANSFORMER_DIFFUSERS_IGNORED: tuple[str, ...] = (r"blocks\.\d+\.attn2\.norm_added_q\.\w+",)
"""Checkpoint keys with no counterpart that are dropped on load (diffusers ignores them too)."""

TRANSFORMER_TO_DIFFUSERS_KEYS: KeyMap = (
    (r"time_embedding\.0\.(\w+)", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"time_embedding\.2\.(\w+)", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"time_projection\.1\.(\w+)", r"condition_embedder.time_proj.\1"),
    (r"text_embedding\.0\.(\w+)", r"condition_embedder.text_embedder.linear_1.\1"),
    (r"text_embedding\.2\.(\w+)", r"condition_embedder.text_embedder.linear_2.\1"),
    (r"img_emb\.proj\.0\.(\w+)", r"condition_embedder.image_embedder.norm1.\1"),
    (r"img_emb\.proj\.1\.(\w+)", r"condition_embedder.image_embedder.ff.net.0.proj.\1"),
    (r"img_emb\.proj\.3\.(\w+)", r"condition_embedder.image_embedder.ff.net.2.\1"),
    (r"img_emb\.proj\.4\.(\w+)", r"condition_embedder.image_embedder.norm2.\1"),
    (r"img_emb\.emb_pos", r"condition_embedder.image_embedder.pos_embed"),
    (_BLOCK + r"self_attn\.(q|k|v)\.(\w+)", r"blocks.\1.attn1.to_\2.\3"),
    (_BLOCK + r"self_attn\.o\.(\w+)", r"blocks.\1.attn1.to_out.0.\2"),
    (_BLOCK + r"self_attn\.norm_(q|k)\.(\w+)", r"blocks.\1.attn1.norm_\2.\3"),
    (_BLOCK + r"cross_attn\.(q|k|v)\.(\w+)", r"blocks.\1.attn2.to_\2.\3"),
    (_BLOCK + r"cross_attn\.o\.(\w+)", r"blocks.\1.attn2.to_out.0.\2"),
    (_BLOCK + r"cross_attn\.norm_(q|k)\.(\w+)", r"blocks.\1.attn2.norm_\2.\3"),
    (_BLOCK + r"cross_attn\.(k|v)_img\.(\w+)", r"blocks.\1.attn2.add_\2_proj.\3"),
    (_BLOCK + r"cross_attn\.norm_k_img\.(\w+)", r"blocks.\1.attn2.norm_added_k.\2"),
    (_BLOCK + r"norm3\.(\w+)", r"blocks.\1.norm2.\2"),
    (_BLOCK + r"ffn\.0\.(\w+)", r"blocks.\1.ffn.net.0.proj.\2"),
    (_BLOCK + r"ffn\.2\.(\w+)", r"blocks.\1.ffn.net.2.\2"),
    (_BLOCK + r"modulation", r"blocks.\1.scale_shift_table"),
    (r"head\.modulation", r"scale_shift_table"),
    (r"head\.head\.(\w+)", r"proj_out.\1"),
)
"""The inverse table: wanpipe names -> diffusers names (to write checkpoints diffusers can read)."""


def prepare_transformer_state(checkpoint_state_dict: Mapping[str, T]) -> dict[str, T]:
    """Rename a diffusers-format DiT checkpoint to wanpipe's names, dropping the ignored keys
    (original-format keys pass through: no rule matches them)."""
    kept = {
        k: v
        for k, v in checkpoint_state_dict.items()
        if not any(re.fullmatch(p, k) for p in TRANSFORMER_DIFFUSERS_IGNORED)
    }
    return remap_state_dict(kept, TRANSFORMER_DIFFUSERS_KEYS)
