"""Text side of Wan: the UMT5-XXL encoder (the tokenizer's files are read in ``wanpipe.tokenizer``).

The encoder itself is transformers' ``UMT5EncoderModel``; what Wan adds is how its output is used:
embeddings cut to each prompt's true length and zero-padded back to the fixed text length (512).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TextEncoderConfig:
    """The parts of the UMT5 config.json that wanpipe reads; the rest goes to transformers."""

    d_model: int
    vocab_size: int
    num_layers: int
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextEncoderConfig:
        try:
            return cls(
                d_model=int(d["d_model"]),
                vocab_size=int(d["vocab_size"]),
                num_layers=int(d["num_layers"]),
                raw=d,
            )
        except KeyError as e:
            raise ValueError(
                f"text_encoder/config.json lacks {e.args[0]!r}: not a UMT5 encoder config"
            ) from None


def build_text_encoder(config: TextEncoderConfig) -> nn.Module:
    """The UMT5 encoder, built on the meta device (weights are assigned by the loader): wanpipe's
    native :class:`~wanpipe.models.umt5.UMT5Encoder`, with transformers' parameter names and numerics
    (importing transformers' modeling code alone costs about 100 MB of host memory)."""
    from wanpipe.models.umt5 import UMT5Encoder

    with torch.device("meta"):
        model = UMT5Encoder.from_config_dict({k: v for k, v in config.raw.items() if not k.startswith("_")})
    return model


class WanTextEncoder(nn.Module):
    """UMT5 encoder + Wan's use of it: ``forward(ids (B, L), mask (B, L)) -> (B, L, d_model)``,
    each row cut to its true length and zero-padded to L."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, L) int64, mask (B, L) bool -> embeddings (B, L, d_model), zero past each length."""
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)
