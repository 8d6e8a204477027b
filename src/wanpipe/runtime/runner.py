"""How one DiT forward runs: eager or compiled blocks, resident or streamed blocks, with or without a
step cache. The plain path (no option set) is exactly ``embed -> blocks -> head``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from wanpipe.models.transformer import DiTInputs, WanTransformerModel
from wanpipe.runtime.compile import CompiledDiT
from wanpipe.runtime.offload import BlockStreamer
from wanpipe.runtime.step_cache import FirstBlockCache, StepCache, TeaCache, rows_of

Streams = dict[str, slice]
"""Which batch rows belong to which guidance stream: {"cond": rows, "uncond": rows}."""


class DiTRunner:
    def __init__(self, compiled: CompiledDiT | None = None, streamer: BlockStreamer | None = None) -> None:
        self.compiled = compiled
        self.streamer = streamer

    # -- pieces ---------------------------------------------------------------------------------
    def _block_fn(self, x: DiTInputs, rows: Tensor | slice | None) -> Callable[[nn.Module, Tensor], Tensor]:
        context = x.context if rows is None else x.context[rows]
        modulation = x.modulation if rows is None else x.modulation[rows]
        bias = x.context_bias if rows is None or x.context_bias is None else x.context_bias[rows]
        rope, n_img = x.rope, x.num_image_tokens
        if self.compiled is not None:
            compiled = self.compiled.block
            return lambda block, h: compiled(block, h, context, modulation, rope, n_img, bias)
        return lambda block, h: block(h, context, modulation, rope, n_img, context_bias=bias)

    def _run_blocks(self, blocks: Sequence[nn.Module], hidden: Tensor, fn: Callable) -> Tensor:
        if self.streamer is not None:
            return self.streamer.run(blocks, hidden, fn)
        for block in blocks:
            hidden = fn(block, hidden)
        return hidden

    def _head(self, dit: WanTransformerModel, hidden: Tensor, x: DiTInputs) -> Tensor:
        if self.compiled is not None:
            return self.compiled.head(dit.head, hidden, x.temb, x.grid)
        return dit.head(hidden, x.temb, x.grid)

    # -- one forward ------------------------------------------------------------------------------
    def forward(
        self,
        dit: WanTransformerModel,
        latents: Tensor,
        timestep: Tensor,
        context: Tensor,
        image_embeds: Tensor | None = None,
        *,
        text_bias: Tensor | None = None,
        cache: StepCache | None = None,
        streams: Streams | None = None,
        step: int = 0,
        num_steps: int = 1,
    ) -> Tensor:
        """latents (B, C_in, f, h, w) -> prediction (B, C_out, f, h, w).

        context (B, Lt, text_dim) text embeddings, text_bias (B, Lt) their attention bias or None
        (:func:`~wanpipe.models.transformer.compress_text_padding`); image_embeds (B, Li, image_dim)."""
        x = dit.embed(latents, timestep, context, image_embeds, text_bias)
        blocks = list(dit.blocks)
        streams = streams or {"cond": slice(0, latents.shape[0])}
        if isinstance(cache, FirstBlockCache) and blocks:
            hidden = self._first_block_cached(dit, x, blocks, cache, streams)
        elif isinstance(cache, TeaCache):
            hidden = self._teacache(dit, x, blocks, cache, streams, step, num_steps)
        else:
            hidden = self._run_blocks(blocks, x.hidden, self._block_fn(x, None))
        return self._head(dit, hidden, x)

    def _first_block_cached(
        self,
        dit: WanTransformerModel,
        x: DiTInputs,
        blocks: list[nn.Module],
        cache: FirstBlockCache,
        streams: Streams,
    ) -> Tensor:
        cache.bind(dit)
        cache.stats.steps += 1
        h0 = x.hidden
        h1 = self._run_blocks(blocks[:1], h0, self._block_fn(x, None))
        r1 = h1 - h0
        skip = [s for s, rows in streams.items() if cache.can_skip(s, r1[rows])]
        compute = sorted((s for s in streams if s not in skip), key=lambda s: streams[s].start)
        if not skip:
            hidden = self._run_blocks(blocks[1:], h1, self._block_fn(x, None))
            for s, rows in streams.items():
                cache.store(s, r1[rows], hidden[rows] - h1[rows])
            return hidden
        hidden = torch.empty_like(h1)
        if compute:
            rows = rows_of(streams, compute)
            rest = self._run_blocks(blocks[1:], h1[rows], self._block_fn(x, rows))
            offset = 0
            for s in compute:
                sl = streams[s]
                n = sl.stop - sl.start
                part = rest[offset : offset + n]
                offset += n
                hidden[sl] = part
                cache.store(s, r1[sl], part - h1[sl])
        for s in skip:
            sl = streams[s]
            hidden[sl] = h1[sl] + cache.residuals[s]
            cache._count(s)
        return hidden

    def _teacache(
        self,
        dit: WanTransformerModel,
        x: DiTInputs,
        blocks: list[nn.Module],
        cache: TeaCache,
        streams: Streams,
        step: int,
        num_steps: int,
    ) -> Tensor:
        cache.bind(dit)
        cache.stats.steps += 1
        indicator = x.temb[streams["cond"]]
        compute = cache.should_compute(indicator, step, num_steps)
        if not compute and all(s in cache.residuals for s in streams):
            ordered = sorted(streams, key=lambda s: streams[s].start)
            residual = torch.cat([cache.residuals[s] for s in ordered])
            for s in ordered:
                cache._count(s)
            return x.hidden + residual
        hidden = self._run_blocks(blocks, x.hidden, self._block_fn(x, None))
        for s, rows in streams.items():
            cache.residuals[s] = hidden[rows] - x.hidden[rows]
        return hidden
