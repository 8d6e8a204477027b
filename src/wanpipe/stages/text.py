"""The text stage: prompt tokens -> the text the DiT cross-attends to, for every row of a batch.

The UMT5 encoder runs through the prompt cache (repeated prompts, typically the negative one, are
not encoded again), on rank 0 alone in a parallel run (the embeddings are broadcast), and the zero
padding of each row is compressed once per request (``RuntimeOptions.compress_text``): each row's
prompt tokens plus one padding key whose logit gets + log(n) for its n padding rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from wanpipe.context import PromptTravel
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
    travel: tuple[TextContext, ...] = ()
    """Prompt travel: one TextContext per distinct prompt (``prompts``' order), () without."""
    prompts: PromptTravel | None = None
    """Which prompt each latent frame takes (:meth:`TextStage.travel`), None without prompt travel."""

    @property
    def guided(self) -> bool:
        """Whether the unconditional rows are there."""
        return self.embeds.shape[0] > self.batch

    def select(self, keep: Sequence[int]) -> TextContext:
        """Only the batch rows ``keep`` (and their unconditional rows)."""
        index = list(keep) + ([self.batch + j for j in keep] if self.guided else [])
        bias = None if self.bias is None else self.bias[index]
        travel = tuple(t.select(keep) for t in self.travel)
        return TextContext(self.embeds[index], bias, len(keep), travel, self.prompts)

    def rows(self, guided: bool) -> tuple[Tensor, Tensor | None]:
        """(embeds, bias) for a step with guidance (all rows) or without (the conditional rows)."""
        if guided:
            return self.embeds, self.bias
        return self.embeds[: self.batch], None if self.bias is None else self.bias[: self.batch]

    def per_window(self, guided: bool) -> Callable[[list[int]], dict[str, Tensor | None]] | None:
        """Prompt travel: window (latent frame indices) -> the DiT's text keywords for it, {"context":
        embeds, "text_bias": bias} of the prompt of the window's middle frame; None without travel."""
        if self.prompts is None:
            return None
        prompts, rows = self.prompts, [t.rows(guided) for t in self.travel]

        def text_for(window: list[int]) -> dict[str, Tensor | None]:
            embeds, bias = rows[prompts.prompt_of(window)]
            return {"context": embeds, "text_bias": bias}

        return text_for


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

    def travel(
        self, prompts: PromptTravel, batch: int, negative_tokens: Tensor | None, negative_mask: Tensor | None
    ) -> TextContext:
        """Prompt travel: every distinct prompt (tokens (P, L)) for each of the ``batch`` rows, with the
        rows' negative_* (B, L) or None -> a TextContext of the first prompt holding one per prompt
        (``travel``), all encoded in one call (each distinct prompt, and the negative prompt, once:
        the prompt cache encodes repeated rows once)."""
        count = len(prompts.prompts)
        tokens = torch.as_tensor(prompts.tokens).repeat_interleave(batch, 0)  # (P * B, L), prompt-major
        mask = torch.as_tensor(prompts.mask).repeat_interleave(batch, 0)
        if negative_tokens is not None:
            assert negative_mask is not None
            negative_tokens, negative_mask = negative_tokens.repeat(count, 1), negative_mask.repeat(count, 1)
        whole = self(tokens, mask, negative_tokens, negative_mask)
        parts = tuple(whole.select(range(k * batch, (k + 1) * batch)) for k in range(count))
        return replace(parts[0], travel=parts, prompts=prompts)
