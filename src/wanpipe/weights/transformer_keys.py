"""Key maps for the Wan DiT: diffusers checkpoint names <-> wanpipe module names.

wanpipe's runtime names are those of the original Wan repositories (Wan-Video/Wan2.1
``wan/modules/model.py``), so an original-format checkpoint needs no renaming and a diffusers
checkpoint (``Wan-AI/<name>-Diffusers``, ``transformer/``) goes through the table below, written once
as ``(diffusers name, wanpipe name)`` templates (:class:`~wanpipe.weights.keymap.KeyTable`); ``{param}``
at the end carries ``weight`` / ``bias`` over.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from wanpipe.weights.keymap import KeyMap, KeyTable, remap_state_dict

T = TypeVar("T")

TRANSFORMER_KEYS = KeyTable(
    (
        # Condition embedders.
        ("condition_embedder.time_embedder.linear_1.{param}", "time_embedding.0.{param}"),
        ("condition_embedder.time_embedder.linear_2.{param}", "time_embedding.2.{param}"),
        ("condition_embedder.time_proj.{param}", "time_projection.1.{param}"),
        ("condition_embedder.text_embedder.linear_1.{param}", "text_embedding.0.{param}"),
        ("condition_embedder.text_embedder.linear_2.{param}", "text_embedding.2.{param}"),
        # CLIP image projection (I2V / FLF2V).
        ("condition_embedder.image_embedder.norm1.{param}", "img_emb.proj.0.{param}"),
        ("condition_embedder.image_embedder.ff.net.0.proj.{param}", "img_emb.proj.1.{param}"),
        ("condition_embedder.image_embedder.ff.net.2.{param}", "img_emb.proj.3.{param}"),
        ("condition_embedder.image_embedder.norm2.{param}", "img_emb.proj.4.{param}"),
        ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
        # Self-attention.
        ("{stack}.{n}.attn1.to_{qkv}.{param}", "{stack}.{n}.self_attn.{qkv}.{param}"),
        ("{stack}.{n}.attn1.to_out.0.{param}", "{stack}.{n}.self_attn.o.{param}"),
        ("{stack}.{n}.attn1.norm_{qk}.{param}", "{stack}.{n}.self_attn.norm_{qk}.{param}"),
        # Cross-attention (text, plus the image key/value branch of I2V).
        ("{stack}.{n}.attn2.to_{qkv}.{param}", "{stack}.{n}.cross_attn.{qkv}.{param}"),
        ("{stack}.{n}.attn2.to_out.0.{param}", "{stack}.{n}.cross_attn.o.{param}"),
        ("{stack}.{n}.attn2.norm_{qk}.{param}", "{stack}.{n}.cross_attn.norm_{qk}.{param}"),
        ("{stack}.{n}.attn2.add_{kv}_proj.{param}", "{stack}.{n}.cross_attn.{kv}_img.{param}"),
        ("{stack}.{n}.attn2.norm_added_k.{param}", "{stack}.{n}.cross_attn.norm_k_img.{param}"),
        # Block norms, feed-forward and modulation. diffusers' norm2 (the affine cross-attention norm)
        # is the original's norm3; the two affine-free norms carry no parameters.
        ("{stack}.{n}.norm2.{param}", "{stack}.{n}.norm3.{param}"),
        ("{stack}.{n}.ffn.net.0.proj.{param}", "{stack}.{n}.ffn.0.{param}"),
        ("{stack}.{n}.ffn.net.2.{param}", "{stack}.{n}.ffn.2.{param}"),
        ("{stack}.{n}.scale_shift_table", "{stack}.{n}.modulation"),
        # VACE blocks (``{stack}`` vace_blocks above): the first one's input projection, each one's output.
        ("vace_blocks.{n}.proj_in.{param}", "vace_blocks.{n}.before_proj.{param}"),
        ("vace_blocks.{n}.proj_out.{param}", "vace_blocks.{n}.after_proj.{param}"),
        # Output head.
        ("scale_shift_table", "head.modulation"),
        ("proj_out.{param}", "head.head.{param}"),
    ),
    fields={"stack": "blocks|vace_blocks", "qkv": "q|k|v", "qk": "q|k", "kv": "k|v"},
)
"""``(diffusers, wanpipe)`` name templates, in order; ``{stack}`` is the main ``blocks`` or VACE's
``vace_blocks`` (the same layers); ``patch_embedding.*`` and ``vace_patch_embedding.*`` keep their names."""

TRANSFORMER_DIFFUSERS_KEYS: KeyMap = TRANSFORMER_KEYS.to_runtime()
"""diffusers names -> wanpipe names (reading)."""

TRANSFORMER_TO_DIFFUSERS_KEYS: KeyMap = TRANSFORMER_KEYS.to_checkpoint()
"""wanpipe names -> diffusers names (to write checkpoints diffusers can read)."""

TRANSFORMER_DIFFUSERS_IGNORED: tuple[str, ...] = (r"(vace_)?blocks\.\d+\.attn2\.norm_added_q\.\w+",)
"""Checkpoint keys with no counterpart that are dropped on load (diffusers ignores them too)."""


def prepare_transformer_state(checkpoint_state_dict: Mapping[str, T]) -> dict[str, T]:
    """Rename a diffusers-format DiT checkpoint to wanpipe's names, dropping the ignored keys
    (original-format keys pass through: no rule matches them)."""
    kept = {
        k: v
        for k, v in checkpoint_state_dict.items()
        if not any(re.fullmatch(p, k) for p in TRANSFORMER_DIFFUSERS_IGNORED)
    }
    return remap_state_dict(kept, TRANSFORMER_DIFFUSERS_KEYS)
