"""WanExecutor: batches contexts into tensors and runs them through the stages.

``prepare_inputs(contexts)`` stacks a batch of contexts that share shape and schedule into a
:class:`WanExecutorInputs`; ``execute(inputs)`` runs the stages (:mod:`wanpipe.stages`), each timed
in :class:`Timings`, and returns :class:`WanExecutorOutputs` with the decoded frames::

    text encode -> condition -> denoise -> decode

- text (:mod:`~wanpipe.stages.text`): the prompts' UMT5 embeddings (prompt cache, padding compressed);
- condition (:mod:`~wanpipe.stages.conditioning`): the mode's object, prepared once: VAE encodes of
  input images/videos, CLIP image tokens, the initial latents;
- denoise (:mod:`~wanpipe.stages.denoise`): the loop over the schedule, the DiT run block by block
  through :class:`~wanpipe.runtime.runner.DiTRunner` (compiled, streamed, step-cached or parallel as
  the runtime options say), the conditional and unconditional rows of guidance as one batch;
- decode (:mod:`~wanpipe.stages.decode`): the VAE, whole or in bands across ranks.

How it runs (compile, offload, caches, attention kernels, host memory; the parallel mesh) is set when
it is built (``runtime=``, ``parallel=``) or by its own :meth:`WanExecutor.set_runtime` /
:meth:`WanExecutor.enable_parallel`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wanpipe.batch import WanExecutorInputs, collate
from wanpipe.context import Approximations, InvalidRequestError, WanContext
from wanpipe.models.image_encoder import WanImageEncoder
from wanpipe.models.taehv import TAEHV
from wanpipe.models.text_encoder import WanTextEncoder
from wanpipe.models.transformer import WanTransformerModel
from wanpipe.models.vae import WanVAE
from wanpipe.runtime.attention import AttentionBackendError, attention_backend, sdpa_choice
from wanpipe.runtime.compile import CompiledDiT
from wanpipe.runtime.magcache import MagCache
from wanpipe.runtime.memory import configure_host_memory, trim_host_memory
from wanpipe.runtime.offload import BlockStreamer, ModelOffload, pin_module
from wanpipe.runtime.options import RuntimeOptions
from wanpipe.runtime.runner import DiTRunner
from wanpipe.runtime.step_cache import StepCache
from wanpipe.schedulers import StepNoise
from wanpipe.stages.conditioning import ConditionEncoders, Conditioning, prepare_conditioning
from wanpipe.stages.decode import check_decoder, decode, decode_tiny
from wanpipe.stages.denoise import CancelledError, Guidance, StepCallback, StepPlan, denoise, guided_steps
from wanpipe.stages.experts import Experts
from wanpipe.stages.placement import Placement
from wanpipe.stages.preview import PreviewPlan, PreviewSink, StepPreview, preview_sink
from wanpipe.stages.step_caches import CacheModel, make_step_cache
from wanpipe.stages.stream import aborted_on_error, decode_into, write_frames
from wanpipe.stages.text import TextContext, TextStage
from wanpipe.video_writer import FrameSink
from wanpipe.weights.taehv import load_taehv

if TYPE_CHECKING:
    from wanpipe.parallel.mesh import ParallelMesh

__all__ = [
    "CancelledError",
    "Experts",
    "StepCallback",
    "Timings",
    "WanExecutor",
    "WanExecutorInputs",
    "WanExecutorOutputs",
]


@dataclass
class Timings:
    """Seconds per stage (and what the denoising loop reports)."""

    text_encode_s: float = 0.0
    condition_s: float = 0.0  # VAE encodes of input images/videos, CLIP, the initial latents
    denoise_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0  # torch.compile warm-up of a new shape, not counted in denoise_s
    skipped_steps: int = 0  # step cache: steps whose conditional DiT blocks were skipped
    guided_steps: int = 0  # steps run with classifier-free guidance (cfg_truncation)
    # the SDPA kernels of the DiT's self- and cross-attention, e.g. "self: flash, cross: flash"
    attention: str = ""
    computed_steps: int = 0  # steps whose conditional DiT blocks ran (all of them without a step cache)
    skipped_uncond_steps: int = 0  # step cache: steps whose unconditional (guidance) blocks were skipped
    cache: str = ""  # the step cache that ran ("" for none)
    # MagCache calibration: the per-step magnitude ratios recorded, {"cond": [...], "uncond": [...]}
    cache_calibration: dict[str, list[float]] | None = None


@dataclass
class WanExecutorOutputs:
    """frames (B', F, H, W, 3) float32 in [0, 1]: the decoder's output before any 8-bit rounding;
    ``rows``: the input rows they are (B' < B when rows were cancelled mid-batch); None when the frames
    went into sinks (``execute(sinks=)``); ``decoder``: what decoded them, "vae" or "tiny" (TAEHV)."""

    frames: torch.Tensor | None
    timings: Timings = field(default_factory=Timings)
    rows: list[int] = field(default_factory=list)
    decoder: str = "vae"

    def to(self, device: torch.device | str) -> WanExecutorOutputs:
        frames = None if self.frames is None else self.frames.to(device)
        return WanExecutorOutputs(frames, self.timings, self.rows, self.decoder)


class WanExecutor:
    """Owns the loaded components; runs batches of contexts on one device (or one rank of a mesh).

    ``runtime``: how it runs (:class:`~wanpipe.runtime.options.RuntimeOptions`, the plain path by
    default). ``parallel``: a :class:`~wanpipe.parallel.mesh.ParallelMesh` whose ranks share every DiT
    forward of the loop; then only rank 0 runs the text and image encoders and broadcasts their
    outputs (the other ranks may hold no text encoder at all: ``text_encoder=None``), and the VAE runs
    whole on every rank unless ``vae_halo`` (latent rows, ``--vae-parallel``) is set: then each rank
    decodes a band of rows with that halo and the bands are all-gathered (an approximation).
    """

    def __init__(
        self,
        text_encoder: WanTextEncoder | None,
        transformer: WanTransformerModel | Experts,
        vae: WanVAE,
        *,
        image_encoder: WanImageEncoder | None = None,
        expand_timesteps: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype = torch.float32,
        vae_chunk_frames: int = 1,
        runtime: RuntimeOptions | None = None,
        parallel: ParallelMesh | None = None,
        vae_halo: int | None = None,
    ):
        self.text_encoder = text_encoder
        self.experts = transformer if isinstance(transformer, Experts) else Experts(transformer)
        self.vae = vae
        self.image_encoder = image_encoder
        self.expand_timesteps = expand_timesteps
        self.vae_dtype = vae_dtype
        self.vae_chunk_frames = vae_chunk_frames  # the loaded default; runtime.vae_chunk_frames wins
        self.placement = Placement(torch.device(device), dtype)
        self.encoders = ConditionEncoders(
            vae,
            image_encoder,
            self.placement,
            vae_dtype,
            expand_timesteps,
            self.transformer.config.patch_size,
            self.transformer.config.vace_layers,
        )
        self.vae_halo: int | None = None
        self.tiny_vae: TAEHV | None = None  # decoder="tiny" (load_tiny_vae)
        self.last_cache_stats = None
        self.set_runtime(runtime or RuntimeOptions())
        if parallel is not None:
            self.enable_parallel(parallel, vae_halo=vae_halo)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype

    @property
    def parallel(self) -> ParallelMesh | None:
        """The parallel mesh (:meth:`enable_parallel`), or None for one process."""
        return self.placement.mesh

    @property
    def transformer(self) -> WanTransformerModel:
        """The (high-noise) DiT."""
        return self.experts.high

    @property
    def accepts_vace(self) -> bool:
        """The DiT has VACE blocks (it takes control latents)."""
        return self.transformer.config.vace_layers is not None

    @property
    def accepts_animate(self) -> bool:
        """The DiT is a Wan2.2-Animate one (it takes pose latents and face frames)."""
        return self.transformer.config.is_animate

    @property
    def _cache_model(self) -> CacheModel:
        refused = "Animate" if self.accepts_animate else "VACE" if self.accepts_vace else None
        return CacheModel(self.transformer.config, self.experts.two, self.expand_timesteps, refused)

    # -- construction -------------------------------------------------------------------------
    def set_runtime(self, options: RuntimeOptions, *, device: torch.device | str | None = None) -> None:
        """Run with ``options`` from now on: module placement (offload), compiled blocks, the text stage.

        ``device``: the compute device, when the modules were loaded elsewhere (e.g. loaded on the CPU
        and run on "cuda" with offload, so the full model never sits on the GPU)."""
        if options.cache not in (None, "none") and (self.accepts_vace or self.accepts_animate):
            raise ValueError(self._cache_model.refusal(f"--cache {options.cache}"))
        if options.cache == "teacache" and options.teacache_coefficients is None:
            self._cache_model.teacache_variant()  # refuse a model without published coefficients now
        if options.cache == "magcache":  # the same for MagCache's ratios
            self._cache_model.complete("magcache", options.cache_options or {}, (0, 0), image=False)
        if device is not None:
            self.placement.device = torch.device(device)
        dev = self.device
        self.runtime = options
        if dev.type == "cpu":
            configure_host_memory(options.host_memory)
        storage = torch.device("cpu")
        encoders = (self.text_encoder, self.vae, self.image_encoder)
        offload, streamer = None, None
        if options.offload == "model":
            offload = ModelOffload(dev, storage)
            for module in (*encoders, *self.experts.models):
                if module is not None:
                    module.to(storage)
                    pin_module(module)
        elif options.offload == "block":
            streamer = BlockStreamer(dev, options.offload_buffers)
            for dit in self.experts.models:
                for name, child in dit.named_children():
                    if name in ("blocks", "vace_blocks", "face_adapter"):
                        child.to(storage)
                        pin_module(child)
                    else:
                        child.to(dev)
                dit.clear_rope_cache()
        else:
            for module in (*encoders, *self.experts.models):
                if module is not None:
                    module.to(dev)
        if options.text_encoder_device is not None and self.text_encoder is not None:
            self.text_encoder.to(options.text_encoder_device)
        self.placement.offload = offload
        self.experts.offload = offload
        self.encoders.vae_memory = options.vae_memory
        compiled = CompiledDiT(mode=options.compile_mode) if options.compile else None
        self.runner = DiTRunner(compiled=compiled, streamer=streamer, mesh=self.placement.mesh)
        self.text = TextStage(
            self.text_encoder,
            self.placement,
            encoder_device=options.text_encoder_device,
            cache_size=options.text_cache_size,
            compress=options.compress_text,
        )

    def enable_parallel(self, mesh: ParallelMesh | None, *, vae_halo: int | None = None) -> None:
        """Share every DiT forward across ``mesh``'s ranks (None: back to one process); ``vae_halo``:
        decode by bands of rows with that many latent rows of halo (None: the whole frame on every
        rank). Raises ValueError when the runtime options do not combine with it (:meth:`check_parallel`)."""
        if vae_halo is not None and vae_halo < -1:  # -1: the exact bands (parallel.vae.EXACT_HALO)
            raise ValueError(f"--vae-halo must be >= 0 latent rows, got {vae_halo}")
        before = self.placement.mesh, self.vae_halo
        self.placement.mesh = self.runner.mesh = mesh
        self.vae_halo = vae_halo if mesh is not None else None
        try:
            self.check_parallel()
        except ValueError:
            (self.placement.mesh, self.vae_halo), self.runner.mesh = before, before[0]
            raise

    def check_step_cache(self, approximations: Approximations) -> None:
        """Raise ValueError if the step cache a request asks for (its residual_threshold, or the runtime's
        cache) does not apply to this model: VACE and Animate checkpoints take none yet."""
        self._make_cache(approximations)

    def check_parallel(self, approximations: Approximations | None = None) -> None:
        """Raise ValueError if ``parallel`` is set together with something it does not combine with
        yet: compiled or streamed DiT blocks (``--compile``, ``--offload block``) or a step cache
        (the runtime's, or a request's residual_threshold). Same answer on every rank."""
        if self.parallel is None:
            return
        cache = None if approximations is None else self._make_cache(approximations)
        clash = [
            name
            for name, on in (
                ("--compile", self.runner.compiled is not None),
                ("--offload block", self.runner.streamer is not None),
                ("a step cache (--cache / residual_threshold)", cache is not None),
                ("an Animate checkpoint", self.accepts_animate),
            )
            if on
        ]
        if clash:
            message = (
                f"sequence/CFG parallelism (--ulysses/--ring/--cfg-parallel) does not combine with "
                f"{', '.join(clash)} yet: leave {'them' if len(clash) > 1 else 'it'} off"
            )
            if cache is not None and approximations is not None:  # the request's (or its default's) cache
                named = approximations.cache is None and approximations.residual_threshold
                raise InvalidRequestError(message, "residual_threshold" if named else "cache")
            raise ValueError(message)

    def check_approximations(
        self, approximations: Approximations, latent_size: tuple[int, int] | None = None, image: bool = False
    ) -> None:
        """Raise InvalidRequestError for a request's approximations this executor cannot run: a step
        cache without the model data it needs (TeaCache's coefficients, MagCache's ratios), or any
        step cache on a parallel run; ``decoder="tiny"`` without a loaded TAEHV."""
        check_decoder(approximations.decoder, self.tiny_vae)
        self._make_cache(approximations, latent_size, image)
        self.check_parallel(approximations)

    # -- batching -----------------------------------------------------------------------------
    def prepare_inputs(self, contexts: list[WanContext]) -> WanExecutorInputs:
        """Stack contexts (same latent shape, schedule and kind of conditioning) into CPU tensors."""
        return collate(contexts)

    # -- stages -------------------------------------------------------------------------------
    def encode_text(self, inputs: WanExecutorInputs) -> TextContext:
        """The text stage: the batch's prompt (and negative prompt) embeddings, padding compressed."""
        if inputs.prompt_travel is not None:  # per-window prompts: each distinct one encoded
            batch = inputs.tokens.shape[0]
            return self.text.travel(inputs.prompt_travel, batch, inputs.negative_tokens, inputs.negative_mask)
        return self.text(inputs.tokens, inputs.mask, inputs.negative_tokens, inputs.negative_mask)

    def condition(self, inputs: WanExecutorInputs) -> tuple[Conditioning, torch.Tensor]:
        """The condition stage: the batch's mode object (its inputs encoded) and initial latents."""
        return prepare_conditioning(inputs, self.encoders)

    def denoise(
        self,
        inputs: WanExecutorInputs,
        text: TextContext,
        conditioning: Conditioning,
        latents: torch.Tensor,
        callback: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        cancelled_rows: Callable[[], Collection[int]] | None = None,
        timings: Timings | None = None,
        preview: StepPreview | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """The denoise stage: initial latents (B, C, f, h, w) -> (denoised latents (B', ...) float32,
        the rows they are; see :func:`~wanpipe.stages.denoise.denoise` for the cancel checks). What the
        loop reports (guided and skipped steps, compile time, attention kernels) goes into ``timings``."""
        report = timings if timings is not None else Timings()
        schedule = inputs.schedule
        num_steps = schedule.num_inference_steps
        device = self.device
        self.check_parallel(inputs.approximations)
        scales = {"high": inputs.guidance_scale.to(device).view(-1, 1, 1, 1, 1)}
        if inputs.guidance_scale_2 is not None:
            scales["low"] = inputs.guidance_scale_2.to(device).view(-1, 1, 1, 1, 1)
        fraction = inputs.approximations.cfg_truncation
        if fraction is None:
            fraction = self.runtime.cfg_truncation
        guidance = Guidance(
            do_cfg=inputs.do_cfg.to(device).view(-1, 1, 1, 1, 1),
            scales=scales,
            steps=guided_steps(num_steps, fraction) if text.guided else 0,
        )
        plan = StepPlan(
            schedule=schedule,
            timesteps=torch.tensor(schedule.timesteps).to(device),
            experts=Experts.plan(schedule.timesteps, inputs.boundary_timestep),
        )
        h, w = inputs.latents.shape[3:]
        image = inputs.condition_pixels is not None
        windows = inputs.approximations.context_windows
        cache = None if windows else self._make_cache(inputs.approximations, latent_size=(h, w), image=image)
        report.guided_steps = guidance.steps
        report.attention = self._attention_report(latents, text)
        self.runner.compile_s = 0.0
        with attention_backend(self.runtime.attention_backend):
            latents, rows = denoise(
                self.runner,
                self.experts,
                plan,
                text,
                conditioning,
                guidance,
                latents,
                dtype=self.dtype,
                cache=cache,
                callback=callback,
                should_cancel=should_cancel,
                cancelled_rows=cancelled_rows,
                noise=None
                if inputs.noise_states is None
                else StepNoise.from_states(inputs.noise_states, device),
                windows=windows,
                preview=preview,
            )
        report.compile_s = self.runner.compile_s
        self.last_cache_stats = None if cache is None else cache.stats
        report.computed_steps = len(plan.experts)
        if cache is not None:
            report.cache = cache.kind
            report.skipped_steps = cache.stats.skipped_steps
            report.skipped_uncond_steps = cache.stats.skipped_uncond_steps
            report.computed_steps -= cache.stats.skipped_steps
            if isinstance(cache, MagCache) and cache.calibration is not None:
                report.cache_calibration = {k: list(v) for k, v in cache.calibration.items()}
        return latents, rows

    def load_tiny_vae(self, path_or_id: str | Path | None, latent_channels: int) -> None:
        """TAEHV for ``decoder="tiny"`` on the device in the VAE's dtype (None: none; :func:`load_taehv`)."""
        self.tiny_vae = (
            load_taehv(path_or_id, self.device, self.vae_dtype, latent_channels) if path_or_id else None
        )

    def decode(self, latents: torch.Tensor, decoder: str = "vae") -> torch.Tensor:
        """The decode stage: denoised latents (B, z, f, h, w) -> frames (B, F, H, W, 3) float32 in [0, 1]
        through the VAE, or TAEHV for ``decoder="tiny"``."""
        if decoder == "tiny":
            return decode_tiny(self.tiny_vae, latents, self.placement, self.runtime.vae_chunk_frames)
        return decode(
            self.vae,
            latents,
            self.placement,
            vae_dtype=self.vae_dtype,
            chunk_frames=self.runtime.vae_chunk_frames or self.vae_chunk_frames,
            halo=self.vae_halo,
            memory=self.runtime.vae_memory,
        )

    def decode_into(
        self, latents: torch.Tensor, sinks: Sequence[FrameSink], num_frames: int, decoder: str = "vae"
    ) -> None:
        """The decode stage, streaming: row b's frames into ``sinks[b]`` chunk by chunk (uint8); TAEHV's
        (``decoder="tiny"``, a small decode) are written from the whole float frames."""
        if decoder == "tiny":
            return write_frames(self.decode(latents, decoder)[:, :num_frames], sinks)
        decode_into(
            self.vae,
            latents,
            self.placement,
            sinks,
            vae_dtype=self.vae_dtype,
            chunk_frames=self.runtime.vae_chunk_frames or self.vae_chunk_frames,
            halo=self.vae_halo,
            memory=self.runtime.vae_memory,
            num_frames=num_frames,
        )

    def _attention_report(self, latents: torch.Tensor, text: TextContext) -> str:
        """Which SDPA kernels this request's self- and cross-attention get (see wanpipe.runtime.attention)."""
        if self.parallel is not None:
            return "sequence-parallel"
        cfg = self.transformer.config
        f, h, w = latents.shape[2:]
        tokens = (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
        head_dim = cfg.dim // cfg.num_attention_heads
        with attention_backend(self.runtime.attention_backend):
            own = sdpa_choice(tokens, tokens, head_dim, self.dtype, self.device)
            cross = sdpa_choice(
                tokens, text.embeds.shape[1], head_dim, self.dtype, self.device, text.bias is not None
            )
        if "none" in (own, cross):
            raise AttentionBackendError(
                f"attention backend {self.runtime.attention_backend!r} cannot run this model's attention on "
                f"{self.device.type} in {self.dtype} (head size {head_dim}); use 'auto' to let PyTorch choose"
            )
        return f"self: {own}, cross: {cross}"

    def _make_cache(
        self, approximations: Approximations, latent_size: tuple[int, int] | None = None, image: bool = False
    ) -> StepCache | None:
        """The step cache for a batch (:func:`~wanpipe.stages.step_caches.make_step_cache`)."""
        return make_step_cache(self._cache_model, self.runtime, approximations, latent_size, image)

    def _trim(self) -> None:
        if self.device.type == "cpu" and (
            self.runtime.trim_host_memory or self.runtime.host_memory == "lean"
        ):
            trim_host_memory()

    @contextlib.contextmanager
    def _stage(self, timings: Timings, name: str) -> Iterator[None]:
        """Time a stage into ``timings.<name>`` (the device synchronised); then trim host memory."""
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        setattr(timings, name, getattr(timings, name) + time.perf_counter() - t0)  # segments add up
        self._trim()

    @torch.inference_mode()
    def execute(
        self,
        inputs: WanExecutorInputs,
        callback: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        cancelled_rows: Callable[[], Collection[int]] | None = None,
        preview: PreviewPlan | None = None,
        sinks: Sequence[FrameSink] | None = None,
    ) -> WanExecutorOutputs:
        """text encode -> condition -> denoise -> decode: -> frames (B', F, H, W, 3), each stage timed.

        ``should_cancel()`` True stops the batch (CancelledError); ``cancelled_rows()`` names rows whose
        work stops at the next step (their frames are not made: ``outputs.rows`` lists the rows made).
        ``preview``: live previews of the rows (:mod:`~wanpipe.stages.preview`). ``sinks``: one per
        input row: the frames go into them as they are decoded (opened, not closed; all aborted on an
        error, those of rows not made aborted) and ``outputs.frames`` is None."""
        timings, decoder = Timings(), inputs.approximations.decoder
        check_decoder(decoder, self.tiny_vae)
        with aborted_on_error(sinks):
            with self._stage(timings, "text_encode_s"):
                text = self.encode_text(inputs)
            with self._stage(timings, "condition_s"):
                conditioning, noise = self.condition(inputs)
            step_sink = preview_sink(
                preview, self.runtime.preview_decoder, self.vae.config, self.tiny_vae, self.device
            )
            with step_sink or contextlib.nullcontext():
                frames, rows = self._segments(
                    inputs, text, conditioning, noise, timings, callback, should_cancel, cancelled_rows,
                    step_sink, sinks,
                )  # fmt: skip
        for row, sink in enumerate(sinks or ()):
            if row not in rows:
                sink.abort()
        timings.denoise_s -= timings.compile_s  # the compile warm-up is reported apart
        return WanExecutorOutputs(frames=frames, timings=timings, rows=rows, decoder=decoder)

    def _segments(
        self,
        inputs: WanExecutorInputs,
        text: TextContext,
        conditioning: Conditioning,
        latents: torch.Tensor,
        timings: Timings,
        callback: StepCallback | None,
        should_cancel: Callable[[], bool] | None,
        cancelled_rows: Callable[[], Collection[int]] | None,
        sink: PreviewSink | None = None,
        sinks: Sequence[FrameSink] | None = None,
    ) -> tuple[torch.Tensor | None, list[int]]:
        """denoise -> decode, once per segment of the video (``inputs.segments``: 1, except Animate's
        long driving videos) -> (frames (B', num_frames, H, W, 3), the rows made).

        Segment k > 0 starts from ``conditioning.next_segment(k, frames of segment k - 1)``, its own
        noise and conditioning (timed as "condition"); each segment is decoded and its new frames
        (``conditioning.new_frames``) appended; the video is cut to ``num_frames`` (the last segment
        may run past it, as diffusers' does). Steps are reported across segments (step k * N + i of
        N * segments); a row cancelled in one segment is not made in the next ones."""
        count, steps = inputs.segments, inputs.schedule.num_inference_steps
        rows = list(range(inputs.latents.shape[0]))
        pieces: list[torch.Tensor] = []
        compile_s = 0.0
        frames = latents
        for index in range(count):
            if index:
                with self._stage(timings, "condition_s"):
                    latents = conditioning.next_segment(index, frames)

            def on_step(i: int, n: int, t: float, offset: int = index * steps) -> None:
                if callback is not None:
                    callback(offset + i, n * count, t)

            def gone(made: list[int] = rows) -> list[int]:  # input rows -> this segment's positions
                return [made.index(r) for r in (cancelled_rows() if cancelled_rows else ()) if r in made]

            with self._stage(timings, "denoise_s"):
                view = None if sink is None else sink.segment(index * steps, steps * count, rows)
                latents, kept = self.denoise(
                    inputs, text, conditioning, latents, on_step, should_cancel, gone, timings, view
                )
            compile_s += timings.compile_s
            if len(kept) < len(rows):
                rows, pieces = [rows[k] for k in kept], [p[kept] for p in pieces]
                conditioning, text, inputs = conditioning.select(kept), text.select(kept), inputs.select(kept)
            with self._stage(timings, "decode_s"):
                decoder = inputs.approximations.decoder
                if sinks is not None and count == 1:  # streamed into the sinks as decoded
                    self.decode_into(latents, [sinks[r] for r in rows], inputs.num_frames, decoder)
                    timings.compile_s = compile_s
                    return None, rows
                frames = self.decode(latents, decoder)
                del latents
            pieces.append(conditioning.new_frames(index, frames))
        timings.compile_s = compile_s
        video = pieces[0] if count == 1 else torch.cat(pieces, dim=1)
        if sinks is not None:
            write_frames(video[:, : inputs.num_frames], [sinks[r] for r in rows])
            return None, rows
        return video[:, : inputs.num_frames], rows
