"""Loading the UMT5 text encoder (transformers' ``UMT5EncoderModel`` names): its tied embedding and the
tensors that stay float32. The original repositories' names are renamed by ``original.py``'s table."""

from __future__ import annotations

import torch

TEXT_ENCODER_ALIASES = {"encoder.embed_tokens.weight": "shared.weight"}
"""transformers ties the encoder's embedding to ``shared``; a checkpoint may store only one of them
(``load_weights(aliases=...)`` fills the other; writers leave the tied copy out)."""


def text_encoder_fp32_patterns(dtype: torch.dtype) -> tuple[str, ...]:
    """transformers keeps T5's feed-forward output projection in fp32 under fp16 (it overflows)."""
    return (r".+\.wo\..+",) if dtype == torch.float16 else ()
