"""How one DiT forward runs: eager or compiled blocks, resident or streamed blocks, with or without a
step cache, in one process or across the ranks of a parallel mesh. The plain path (no option set) is
exactly ``embed -> run_blocks -> head``; every path calls the blocks through
:func:`~wanpipe.models.transformer.run_blocks`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from wanpipe.models.transformer import DiTInputs, WanTransformerModel, call_block, run_blocks
from wanpipe.runtime.compile import CompiledDiT
from wanpipe.runtime.offload import BlockStreamer
from wanpipe.runtime.step_cache import FirstBlockCache, StepCache, TeaCache, rows_of

if TYPE_CHECKING:
    from wanpipe.parallel.mesh import ParallelMesh

Streams = dict[str, slice]
"""Which batch rows belong to which guidance stream: {"cond": rows, "uncond": rows}."""


class DiTRunner:
    """Runs DiT forwards the way the runtime options ask: ``compiled`` blocks (``--compile``),
    ``streamer`` (``--offload block``), ``mesh`` (sequence/CFG parallelism across ranks).

    ``compile_s`` adds up the compile warm-ups (one discarded forward per new shape), which the
    executor reports apart from the denoising time."""

    def __init__(
        self,
        compiled: CompiledDiT | None = None,
        streamer: BlockStreamer | None = None,
        mesh: ParallelMesh | None = None,
    ) -> None:
        self.compiled = compiled
        self.streamer = streamer
        self.mesh = mesh
        self.compile_s = 0.0

    # -- pieces ---------------------------------------------------------------------------------
    def _run_blocks(
        self, blocks: Sequence[nn.Module], hidden: Tensor, x: DiTInputs, rows: Tensor | slice | None = None
    ) -> Tensor:
        call = call_block if self.compiled is None else self.compiled.block
        stream = blocks if self.streamer is None else self.streamer.stream(blocks)
        return run_blocks(stream, hidden, x, rows=rows, call=call)

    def _head(self, dit: WanTransformerModel, hidden: Tensor, x: DiTInputs) -> Tensor:
        if self.compiled is not None:
            return self.compiled.head(dit.head, hidden, x.temb, x.grid)
        return dit.head(hidden, x.temb, x.grid)

    def _warm_up(
        self,
        dit: WanTransformerModel,
        latents: Tensor,
        timestep: Tensor,
        context: Tensor,
        image_embeds: Tensor | None,
        text_bias: Tensor | None,
        control: Tensor | None,
        control_scale: Tensor | None,
        animate: tuple[Tensor | None, Tensor | None, int | None] = (None, None, None),
    ) -> None:
        """Compile for a new shape before timing steps: one discarded forward, added to ``compile_s``."""
        compiled = self.compiled
        assert compiled is not None
        inputs = (latents, timestep, context, image_embeds, text_bias, control, control_scale, *animate[:2])
        key = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in inputs)
        if key in compiled.warmed:
            return
        t0 = time.perf_counter()
        x = dit.embed(*inputs, animate[2])
        blocks = dit.block_sequence(vace=x.control is not None, animate=x.motion is not None)
        self._head(dit, self._run_blocks(blocks, x.hidden, x), x)
        if latents.device.type == "cuda":
            torch.cuda.synchronize(latents.device)
        self.compile_s += time.perf_counter() - t0
        compiled.warmed.add(key)

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
        control_hidden_states: Tensor | None = None,
        control_hidden_states_scale: Tensor | None = None,
        pose_hidden_states: Tensor | None = None,
        face_pixel_values: Tensor | None = None,
        motion_encode_batch_size: int | None = None,
        cache: StepCache | None = None,
        streams: Streams | None = None,
        step: int = 0,
        num_steps: int = 1,
    ) -> Tensor:
        """latents (B, C_in, f, h, w) -> prediction (B, C_out, f, h, w).

        context (B, Lt, text_dim) text embeddings, text_bias (B, Lt) their attention bias or None
        (:func:`~wanpipe.models.transformer.compress_text_padding`); image_embeds (B, Li, image_dim).
        VACE: control_hidden_states (B, vace_in_channels, f, h, w) and control_hidden_states_scale
        (num_vace_layers,) | (B, num_vace_layers) | None (see :meth:`WanTransformerModel.embed`).
        Animate: pose_hidden_states (B, latent_channels, f - 1, h, w), face_pixel_values (B, 3, T, S, S),
        motion_encode_batch_size (see :meth:`WanTransformerModel.embed`).
        ``cache``/``streams``/``step``/``num_steps``: the step cache and the rows of each guidance stream
        (no step cache with control latents or Animate inputs, no parallel mesh with Animate inputs:
        ValueError)."""
        control, control_scale = control_hidden_states, control_hidden_states_scale
        animate = (pose_hidden_states, face_pixel_values, motion_encode_batch_size)
        if control is not None and cache is not None:
            raise ValueError(f"the {cache.kind} step cache does not apply to VACE (control latents) yet")
        if face_pixel_values is not None or pose_hidden_states is not None:
            if cache is not None:
                raise ValueError(f"the {cache.kind} step cache does not apply to Animate (face video) yet")
            if self.mesh is not None:
                raise ValueError("sequence/CFG parallelism does not apply to Animate (face video) yet")
        if self.mesh is not None:
            from wanpipe.parallel.dit import parallel_forward

            return parallel_forward(
                self.mesh, dit, latents, timestep, context, image_embeds, text_bias, control, control_scale
            )
        if self.compiled is not None:
            self._warm_up(
                dit, latents, timestep, context, image_embeds, text_bias, control, control_scale, animate
            )
        x = dit.embed(latents, timestep, context, image_embeds, text_bias, control, control_scale, *animate)
        blocks = dit.block_sequence(vace=x.control is not None, animate=x.motion is not None)
        streams = streams or {"cond": slice(0, latents.shape[0])}
        if isinstance(cache, FirstBlockCache) and blocks:
            hidden = self._first_block_cached(dit, x, blocks, cache, streams)
        elif isinstance(cache, TeaCache):
            hidden = self._teacache(dit, x, blocks, cache, streams, step, num_steps)
        else:
            hidden = self._run_blocks(blocks, x.hidden, x)
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
        h1 = self._run_blocks(blocks[:1], h0, x)
        r1 = h1 - h0
        skip = [s for s, rows in streams.items() if cache.can_skip(s, r1[rows])]
        compute = sorted((s for s in streams if s not in skip), key=lambda s: streams[s].start)
        if not skip:
            hidden = self._run_blocks(blocks[1:], h1, x)
            for s, rows in streams.items():
                cache.store(s, r1[rows], hidden[rows] - h1[rows])
            return hidden
        hidden = torch.empty_like(h1)
        if compute:
            rows = rows_of(streams, compute)
            rest = self._run_blocks(blocks[1:], h1[rows], x, rows)
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
        hidden = self._run_blocks(blocks, x.hidden, x)
        for s, rows in streams.items():
            cache.residuals[s] = hidden[rows] - x.hidden[rows]
        return hidden
