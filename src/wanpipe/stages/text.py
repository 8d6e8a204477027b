"""The text stage: prompt tokens -> the text the DiT cross-attends to, for every row of a batch.

The UMT5 encoder runs through the prompt cache (repeated prompts, typically the negative one, are
not encoded again), on rank 0 alone in a parallel run (the embeddings are broadcast), and the zero
padding of each row is compressed once per request (``RuntimeOptions.compress_text``): each row's
prompt tokens plus one padding key whose logit gets + log(n) for its n padding rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from wanpipe.models.text_encoder import WanTextEncoder
from wanpipe.models.transformer_layers import compress_text_padding
from wanpipe.runtime.text_cache import TextEmbeddingCache
from wanpipe.stages.placement import Placement


@dataclass
class TextContext:
    """The DiT's text input for a batch of B rows.

    embeds (B, Lk, D) conditional rows, then (B, Lk, D) unconditional ones when any row uses
    guidance; bias (same rows, Lk) the attention bias of compressed padding, or None."""

    embeds: Tensor
    bias: Tensor | None
    batch: int

    @property
    def guided(self) -> bool:
        """Whether the unconditional rows are there."""
        return self.embeds.shape[0] > self.batch

    def select(self, keep: Sequence[int]) -> TextContext:
        """Only the batch rows ``keep`` (and their unconditional rows)."""
        index = list(keep) + ([self.batch + j for j in keep] if self.guided else [])
        return TextContext(self.embeds[index], None if self.bias is None else self.bias[index], len(keep))

    def rows(self, guided: bool) -> tuple[Tensor, Tensor | None]:
        """(embeds, bias) for a step with guidance (all rows) or without (the conditional rows)."""
        if guided:
            return self.embeds, self.bias
        return self.embeds[: self.batch], None if self.bias is None else self.bias[: self.batch]


class TextStage:
    """Encodes token ids with ``encoder`` where ``placement`` says; ``encoder_device`` overrides the
    device (``--text-encoder-device cpu``); ``cache_size`` prompts are kept for reuse."""

    def __init__(
        self,
        encoder: WanTextEncoder | None,
        placement: Placement,
        *,
        encoder_device: str | None = None,
        cache_size: int = 32,
        compress: bool = True,
    ) -> None:
        self.encoder = encoder
        self.placement = placement
        self.encoder_device = encoder_device
        self.cache = TextEmbeddingCache(cache_size)
        self.compress = compress

    def _run_encoder(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if self.encoder is None:
            raise RuntimeError(
                "this pipeline was loaded without its text encoder (load_text_encoder=False): it can "
                "only run as a rank other than 0 of a parallel run, where rank 0 encodes the prompts"
            )
        place = self.placement
        if self.encoder_device is not None:
            device = torch.device(self.encoder_device)
            embeds = self.encoder(tokens.to(device), mask.to(device))
        else:
            with place.on_device(self.encoder):
                embeds = self.encoder(tokens.to(place.device), mask.to(place.device))
        return embeds.to(place.device, place.dtype)

    def encode(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """tokens/mask (R, L) -> embeddings (R, L, D) on the device in the DiT's dtype, through the
        prompt cache; in a parallel run rank 0 encodes and broadcasts (a collective)."""
        return self.placement.from_rank0(lambda: self.cache.encode(tokens, mask, self._run_encoder), ndim=3)

    def __call__(
        self, tokens: Tensor, mask: Tensor, negative_tokens: Tensor | None, negative_mask: Tensor | None
    ) -> TextContext:
        """tokens/mask (B, L), negative_* (B, L) or None -> the batch's :class:`TextContext`."""
        batch = tokens.shape[0]
        if negative_tokens is not None:
            assert negative_mask is not None
            tokens, mask = torch.cat([tokens, negative_tokens]), torch.cat([mask, negative_mask])
        embeds = self.encode(tokens, mask)
        bias = None
        if self.compress:
            # Once per request (one host read): each row's zero padding becomes one key with logit + log n.
            multiple = 16 if self.placement.device.type == "cuda" else 1  # aligned keys for fused kernels
            embeds, bias = compress_text_padding(embeds, multiple_of=multiple)
        return TextContext(embeds=embeds, bias=bias, batch=batch)
