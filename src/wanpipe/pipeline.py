"""WanPipeline: the front door for Python users (from_pretrained + generate)."""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import numpy as np
import torch

from wanpipe.config import WanArchConfig
from wanpipe.context import Approximations, GenerationStatus, WanContext, WanRequest
from wanpipe.executor import CancelledError, Timings, WanExecutor
from wanpipe.media import Video
from wanpipe.models.image_encoder import WanImageEncoder, build_clip_vision
from wanpipe.models.text_encoder import WanTextEncoder, build_text_encoder
from wanpipe.models.transformer import WanTransformerModel
from wanpipe.models.transformer_layers import TransformerConfig
from wanpipe.models.vae import WanVAE
from wanpipe.runtime.options import RuntimeOptions
from wanpipe.stages.experts import Experts
from wanpipe.stages.placement import DTYPES, parse_dtype  # noqa: F401  (here before; wanpipe.cli)
from wanpipe.stages.preview import PreviewCallback, PreviewPlan
from wanpipe.text_tokenizer import WanTextTokenizer
from wanpipe.tokenizer import WanTokenizer
from wanpipe.weights.components import ComponentWeights, open_checkpoint, single_file_weights
from wanpipe.weights.fp8 import check_fp8_mode, dit_fp8_state, use_fp8_linears
from wanpipe.weights.gguf_quants import split_gguf_state, use_gguf_linears
from wanpipe.weights.image_encoder_keys import clip_key_map, materialize_clip_buffers
from wanpipe.weights.loader import load_weights
from wanpipe.weights.lora import LoraManager, LoraReport
from wanpipe.weights.safetensors_io import CheckpointError
from wanpipe.weights.text_encoder_keys import TEXT_ENCODER_ALIASES, text_encoder_fp32_patterns
from wanpipe.weights.transformer_keys import TRANSFORMER_DIFFUSERS_IGNORED

if TYPE_CHECKING:
    from wanpipe.parallel.mesh import ParallelConfig
    from wanpipe.video_writer import FrameSink

logger = logging.getLogger(__name__)

LOW_MEMORY_HINT = (
    "lower the memory needed with --offload block (or --offload model), --text-encoder-device cpu, "
    "a smaller --height/--width, fewer --num-frames, --dtype bfloat16 on a GPU, or --device cpu"
)


class WanOutOfMemoryError(RuntimeError):
    """Generation ran out of device memory; the message names the options that lower memory."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LoadOptions(TypedDict, total=False):
    """How :meth:`WanPipeline.from_pretrained` and :meth:`~WanPipeline.from_single_files` build a pipeline.

    ``vae_dtype``: the VAE's dtype (default fp32, as the reference recommends). ``experts`` (Wan 2.2
    A14B): "resident" (default) keeps both experts loaded; "swap" keeps one set of DiT modules and copies
    the other expert's weights into it at the switch (half the DiT memory; the same frames). ``fp8``:
    how fp8 weights run (:mod:`wanpipe.weights.fp8`; default "upcast" for fp8 checkpoints).
    ``load_text_encoder=False`` skips the UMT5 encoder (its weights are never read; the tokenizer is still
    loaded): for the ranks other than 0 of a parallel run, where rank 0 encodes the prompts and
    broadcasts the embeddings; such a pipeline cannot generate on its own. ``runtime``: how it runs
    (:class:`~wanpipe.runtime.options.RuntimeOptions`: compile, offload, step caches, ...; default the
    plain path); with offload the weights load into host memory and visit the device only while they
    run. ``parallel``: the layout of a torch.distributed run (:class:`~wanpipe.parallel.mesh.ParallelConfig`,
    checked against the world and the model's heads), with ``vae_halo`` latent rows for a decode split
    by bands (None: whole on every rank). ``tiny_vae``: TAEHV for ``decoder="tiny"`` (:meth:`load_tiny_vae`)."""

    vae_dtype: str | torch.dtype | None
    experts: str
    fp8: str | None
    load_text_encoder: bool
    runtime: RuntimeOptions | None
    parallel: ParallelConfig | None
    vae_halo: int | None
    tiny_vae: str | Path | None


class WanPipeline:
    """A loaded Wan checkpoint: ``WanPipeline.from_pretrained(path_or_id).generate(prompt)``."""

    def __init__(self, arch: WanArchConfig, tokenizer: WanTokenizer, executor: WanExecutor):
        self.arch = arch
        self.tokenizer = tokenizer
        self.executor = executor

    @property
    def device(self) -> torch.device:
        return self.executor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.executor.dtype

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        sigma_grid: str | None = None,
        **options: Unpack[LoadOptions],
    ) -> WanPipeline:
        """Load a Wan checkpoint from a local folder or a hub id: the diffusers layout
        (``model_index.json``) or an original Wan repository (``config.json``, ``Wan2.1_VAE.pth``,
        ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/``; Wan 2.2 A14B's ``high_noise_model/``
        and ``low_noise_model/``).

        ``dtype`` is the DiT's and text encoder's (default bf16 on CUDA, fp32 on CPU). ``sigma_grid``:
        "diffusers" or "original" (default: "diffusers" for the diffusers layout, "original" for
        original folders). The other options (``vae_dtype``, ``experts``, ``fp8``, ``load_text_encoder``,
        ``runtime``, ``parallel``, ``vae_halo``) are :class:`LoadOptions`.
        """
        arch, weights = open_checkpoint(
            path_or_id, sigma_grid=sigma_grid, revision=revision, cache_dir=cache_dir
        )
        return cls._from_components(arch, weights, device=device, dtype=dtype, **options)

    @classmethod
    def from_single_files(
        cls,
        transformer: str | Path | list[str | Path],
        vae: str | Path,
        text_encoder: str | Path,
        transformer_2: str | Path | list[str | Path] | None = None,
        image_encoder: str | Path | None = None,
        tokenizer: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        sigma_grid: str = "original",
        num_heads: int | None = None,
        vace: str | Path | list[str | Path] | None = None,
        vace_2: str | Path | list[str | Path] | None = None,
        **options: Unpack[LoadOptions],
    ) -> WanPipeline:
        """Load one file per component (ComfyUI's repackaged files, the original repositories' files):
        diffusers or original names, with or without wrapper prefixes (``model.diffusion_model.``),
        fp32/fp16/bf16/fp8 (scaled or not), ``.safetensors`` (or ``.pth`` read with ``weights_only``); the
        transformer also as ``.gguf`` (its block linears kept quantized: :mod:`wanpipe.weights.gguf_quants`).

        The variant is inferred from tensor names and shapes. ``transformer_2`` is Wan 2.2 A14B's
        low-noise expert. ``tokenizer`` is a folder or a hub id (default ``google/umt5-xxl``, fetched with
        ``huggingface_hub``). ``num_heads`` overrides the head count (default: width / 128, as in every
        released Wan DiT). The scheduler is the original repositories' UniPC with their shift. ``vace``
        (and ``vace_2`` for ``transformer_2``): a VACE module held as its own file (ComfyUI/Kijai's
        ``Wan2_1-VACE_module_*.safetensors``: only ``vace_blocks.*`` / ``vace_patch_embedding.*``), joined to
        the base text-to-video DiT; a whole VACE file goes in ``transformer``. The other options are
        :class:`LoadOptions`, as in :meth:`from_pretrained`.
        """
        arch, weights = single_file_weights(
            transformer,
            vae,
            text_encoder,
            transformer_2,
            image_encoder,
            tokenizer,
            num_heads=num_heads,
            sigma_grid=sigma_grid,
            vace=vace,
            vace_2=vace_2,
        )
        return cls._from_components(arch, weights, device=device, dtype=dtype, **options)

    @classmethod
    def _from_components(
        cls,
        arch: WanArchConfig,
        weights: ComponentWeights,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        vae_dtype: str | torch.dtype | None = None,
        experts: str = "resident",
        fp8: str | None = None,
        load_text_encoder: bool = True,
        runtime: RuntimeOptions | None = None,
        parallel: ParallelConfig | None = None,
        vae_halo: int | None = None,
        tiny_vae: str | Path | None = None,
    ) -> WanPipeline:
        """Build every module on the meta device and assign the weights of ``weights`` (runtime names);
        without ``load_text_encoder`` the executor gets no text encoder (see :meth:`from_pretrained`)."""
        runtime = runtime or RuntimeOptions()
        compute = torch.device(device) if device is not None else default_device()
        dtype = parse_dtype(dtype, compute)
        # With offload the weights load into host memory and only visit the device while they run.
        device = torch.device("cpu") if runtime.offload != "none" else compute
        mesh = None
        if parallel is not None:
            from wanpipe.parallel.mesh import ParallelMesh

            mesh = ParallelMesh.build(parallel, num_heads=arch.transformer.num_attention_heads)
        vae_dtype = parse_dtype(vae_dtype, torch.device("cpu"))
        if experts not in ("resident", "swap"):
            raise ValueError(f"experts must be 'resident' or 'swap', got {experts!r}")
        check_fp8_mode(fp8, device)

        t0 = time.perf_counter()
        load_into = functools.partial(load_weights, dtype=dtype, device=device)
        text_tokenizer = WanTextTokenizer(weights.tokenizer, max_length=arch.get_max_seq_len())
        text_encoder = None
        if load_text_encoder:
            encoder = build_text_encoder(arch.text_encoder)
            keep = text_encoder_fp32_patterns(dtype)
            load_into(
                encoder,
                weights.text_encoder(),
                component="text_encoder",
                keep_in_fp32=keep,
                aliases=TEXT_ENCODER_ALIASES,
            )
            text_encoder = WanTextEncoder(encoder)

        def dit_state(load: Callable[[], Any]) -> tuple[dict[str, torch.Tensor], set[str], dict[str, int]]:
            # GGUF blocks stay as they are (their layers are GGUFLinear); fp8 applies to the rest.
            state, gguf_layers = split_gguf_state(load())
            raw = {k: state.pop(k) for k in [f"{layer}.weight" for layer in gguf_layers]}
            state, fp8_layers = dit_fp8_state(state, fp8)
            return {**state, **raw}, fp8_layers, gguf_layers

        def dit(name: str, config: TransformerConfig, load: Callable[[], Any]) -> WanTransformerModel:
            state, fp8_layers, gguf_layers = dit_state(load)
            with torch.device("meta"):
                model = WanTransformerModel(config)
            if fp8_layers:
                use_fp8_linears(model, fp8_layers, "scaled_mm" if fp8 == "scaled_mm" else "upcast")
            if gguf_layers:
                use_gguf_linears(model, gguf_layers)
            return load_into(
                model,
                state,
                component=name,
                keep_in_fp32=(*WanTransformerModel.keep_in_fp32, r".+\.weight_scale"),
                keep_dtype=[re.escape(n) + r"\.weight" for n in fp8_layers],
                ignore_unexpected=TRANSFORMER_DIFFUSERS_IGNORED,
            )

        transformer: WanTransformerModel | Experts = dit("transformer", arch.transformer, weights.transformer)
        if arch.transformer_2 is not None:
            assert weights.transformer_2 is not None
            if experts == "resident":
                transformer = Experts(
                    transformer, dit("transformer_2", arch.transformer_2, weights.transformer_2)
                )
            else:
                # Fresh mappings: the resident module's tensors must not alias the states it swaps in.
                loaded = {
                    which: dit_state(load)
                    for which, load in (("high", weights.transformer), ("low", weights.transformer_2))
                }
                if loaded["high"][2] != loaded["low"][2]:
                    raise CheckpointError(
                        "experts='swap' needs both experts' GGUF layers in the same quantization types: "
                        "use experts='resident'"
                    )
                states = {which: parts[0] for which, parts in loaded.items()}
                transformer = Experts(transformer, swap_states=states)

        with torch.device("meta"):
            vae = WanVAE(arch.vae)
        load_weights(vae, weights.vae(), component="vae", dtype=vae_dtype, device=device)
        image_encoder = None
        if arch.image_encoder is not None and arch.transformer.image_dim is not None:
            if weights.image_encoder is None:
                raise CheckpointError("this checkpoint needs an image encoder (CLIP) and none was given")
            vision = build_clip_vision(arch.image_encoder)
            load_into(
                vision,
                weights.image_encoder(),
                component="image_encoder",
                prepare=clip_key_map(vision),
                materialize=materialize_clip_buffers,
            )
            image_encoder = WanImageEncoder(vision)
        logger.info("loaded %s (%s) in %.1f s", arch.path, arch.variant.name, time.perf_counter() - t0)
        executor = WanExecutor(
            text_encoder,
            transformer,
            vae,
            image_encoder=image_encoder,
            expand_timesteps=arch.expand_timesteps,
            device=compute,
            dtype=dtype,
            vae_dtype=vae_dtype,
            runtime=runtime,
            parallel=mesh,
            vae_halo=vae_halo,
        )
        executor.load_tiny_vae(tiny_vae, arch.vae.z_dim)
        return cls(arch, WanTokenizer(arch, text_tokenizer), executor)

    # -- how it runs ------------------------------------------------------------------------------
    def set_runtime(self, options: RuntimeOptions, *, device: str | torch.device | None = None) -> None:
        """Run with ``options`` from now on (see :meth:`WanExecutor.set_runtime`)."""
        self.executor.set_runtime(options, device=device)

    def enable_parallel(self, parallel: ParallelConfig | None, *, vae_halo: int | None = None) -> None:
        """Share every DiT forward across the ranks of a torch.distributed run laid out as ``parallel``
        (None: one process again); ``vae_halo`` as in :meth:`from_pretrained`. Every rank calls it."""
        mesh = None
        if parallel is not None:
            from wanpipe.parallel.mesh import ParallelMesh

            mesh = ParallelMesh.build(
                parallel, num_heads=self.executor.transformer.config.num_attention_heads
            )
        self.executor.enable_parallel(mesh, vae_halo=vae_halo)

    def load_tiny_vae(self, path_or_id: str | Path | None) -> None:
        """TAEHV (a taew2_1 / taew2_2 file or hub ``owner/name/FILE``) for ``decoder="tiny"``; None: unload."""
        self.executor.load_tiny_vae(path_or_id, self.arch.vae.z_dim)

    # -- LoRA -------------------------------------------------------------------------------------
    def load_lora(
        self,
        path: str | Path | Mapping[str, torch.Tensor],
        scale: float = 1.0,
        expert: str = "both",
        *,
        name: str | None = None,
        strict: bool = False,
    ) -> LoraReport:
        """Merge a LoRA adapter into the DiT weights (diffusers/peft names, original names with the
        ``diffusion_model.`` prefix, or kohya/musubi ``lora_unet_*`` with ``lora_down``/``lora_up``/``alpha``;
        ``diff``/``diff_b`` full deltas too). ``expert``: "high", "low" or "both" (Wan 2.2 A14B).

        Keys that match no DiT layer are reported by name (a warning; an error with ``strict``). Several
        adapters add up; :meth:`unload_lora` restores the base weights bit for bit. On a GGUF DiT a
        touched layer is dequantized and merged in float (it then runs as a plain linear; unloading puts
        its quantized blocks back).
        """
        return self._loras().load(path, scale, expert, name=name, strict=strict)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one adapter (by name) or all of them; the base weights come back exactly."""
        self._loras().unload(name)

    @property
    def loras(self) -> list[str]:
        """Names of the merged adapters, in load order."""
        return [] if getattr(self, "_lora_manager", None) is None else self._lora_manager.names

    @property
    def lora_manager(self) -> LoraManager:
        """The adapters merged into the DiT; a server switches its per-request set through it
        (:meth:`LoraManager.switch`)."""
        return self._loras()

    def _loras(self) -> LoraManager:
        if getattr(self, "_lora_manager", None) is None:
            self._lora_manager = LoraManager(self.executor.experts, self.dtype)
        return self._lora_manager

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        flow_shift: float | None = None,
        seed: int | None = None,
        latents: np.ndarray | torch.Tensor | None = None,
        callback: Callable[[int, int, float], None] | None = None,
        *,
        image: Any = None,
        last_image: Any = None,
        video: Any = None,
        strength: float | None = None,
        guidance_scale_2: float | None = None,
        residual_threshold: float | None = None,
        cfg_truncation: float | None = None,
        progress: bool = True,
        sampler: str | None = None,
        sigmas: Sequence[float] | None = None,
        timesteps: Sequence[float] | None = None,
        preset: str | None = None,
        mask: Any = None,
        reference_images: Any = None,
        conditioning_scale: float | list[float] | None = None,
        cache: str | None = None,
        cache_options: dict[str, Any] | None = None,
        pose_video: Any = None,
        face_video: Any = None,
        background_video: Any = None,
        mask_video: Any = None,
        mode: str | None = None,
        segment_frame_length: int | None = None,
        prev_segment_conditioning_frames: int | None = None,
        context_frames: int | None = None,
        context_overlap: int | None = None,
        context_schedule: str | None = None,
        context_blend: str | None = None,
        decoder: str | None = "vae",
        preview: PreviewCallback | None = None,
        preview_every: int | None = None,
        prompts: list[tuple[int, int, str]] | None = None,
    ) -> Video:
        """Generate one video. Values left ``None`` take the checkpoint family's defaults.

        Returns a :class:`~wanpipe.media.Video` whose ``frames`` are (F, H, W, 3) float32 in [0, 1].
        ``callback(step, num_steps, timestep)`` is called after every denoising step. ``image`` (and
        ``last_image``) condition image-to-video checkpoints; ``video`` with ``strength`` re-noises a
        video (video-to-video); ``guidance_scale_2`` is the low-noise expert's (Wan 2.2 A14B). Images
        and videos are paths, PIL images or uint8 arrays. ``residual_threshold`` (step cache),
        ``cfg_truncation`` and ``cache`` ("first-block", "teacache", "taylorseer", "magcache", "none")
        with its ``cache_options`` are opt-in approximations (see ``wanpipe.runtime``,
        docs/fast-sampling.md). ``sampler`` ("unipc", "euler", "lcm", "dmd"; default: the checkpoint's
        scheduler) and a schedule of its own, ``sigmas`` (one per step in (0, 1], strictly decreasing)
        or ``timesteps`` (the same on the 0-1000 scale), used as given, not shifted again: see
        docs/fast-sampling.md. ``preset`` names a published few-step setting (``wanpipe.presets``) that
        fills the values left ``None``. ``decoder``: "vae" or "tiny" (TAEHV: :meth:`load_tiny_vae`).

        VACE checkpoints (``docs/vace.md``): ``video`` is the control or source video, ``mask`` marks
        what to generate (white) and what to keep (black), one image or one per frame;
        ``reference_images`` one image or a list (subjects, faces, objects); ``conditioning_scale`` one
        number or one per VACE layer (default 1.0).

        Wan2.2-Animate checkpoints (``docs/animate.md``): ``image`` is the character, ``pose_video`` and
        ``face_video`` the preprocessed driving videos (``mode="replace"`` adds ``background_video`` and
        ``mask_video``); the video is as long as ``pose_video``, made in segments of
        ``segment_frame_length`` frames (default 77) that continue from the last
        ``prev_segment_conditioning_frames`` (1 or 5) of the one before.
        ``wanpipe.animate_request.preprocessed_inputs(folder)`` gives these from the original
        preprocessing script's folder. Long videos: ``context_*`` and ``prompts`` (docs/long-video.md: windows, prompt travel).
        ``preview(Preview)`` gets live previews every ``preview_every`` steps (docs/previews.md).
        """
        request = WanRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            flow_shift=flow_shift,
            seed=seed,
            latents=latents,
            guidance_scale_2=guidance_scale_2,
            image=image,
            last_image=last_image,
            video=video,
            strength=strength,
            residual_threshold=residual_threshold,
            cfg_truncation=cfg_truncation,
            sampler=sampler,
            sigmas=sigmas,  # type: ignore[arg-type]  # resolve turns a sequence or 1-D array into a list
            timesteps=timesteps,  # type: ignore[arg-type]
            preset=preset,
            mask=mask,
            reference_images=reference_images,
            conditioning_scale=conditioning_scale,
            cache=cache,
            cache_options=cache_options,
            pose_video=pose_video,
            face_video=face_video,
            background_video=background_video,
            mask_video=mask_video,
            mode=mode,
            segment_frame_length=segment_frame_length,
            prev_segment_conditioning_frames=prev_segment_conditioning_frames,
            context_frames=context_frames,
            context_overlap=context_overlap,
            context_schedule=context_schedule,
            context_blend=context_blend,
            decoder=decoder,
            preview_every=preview_every,
            prompts=prompts,
        )
        return self.generate_batch([request], callback=callback, progress=progress, preview=preview)[0]

    def extend(self, video: Any, prompt: str, num_frames: int | None = None, **kwargs: Any) -> Video:
        """Continue ``video`` with ``num_frames`` new frames: :func:`wanpipe.extend.extend_video`."""
        from wanpipe.extend import extend_video

        return extend_video(self, video, prompt, num_frames, **kwargs)

    def check(self, request: WanRequest) -> WanRequest:
        """Validate ``request`` without running it (the CLI's early exit): -> the resolved request
        (every default filled in, a seed drawn, images read; :meth:`WanTokenizer.resolve`). Raises
        InvalidRequestError for a bad value, or for what this pipeline cannot run with it (a step cache
        on a parallel run, on a VACE or Animate checkpoint, or without the model data it needs)."""
        resolved = self.tokenizer.resolve(request)
        stride = self.arch.vae.spatial_stride
        assert resolved.height is not None and resolved.width is not None
        self.executor.check_approximations(
            Approximations.of(resolved),
            (resolved.height // stride, resolved.width // stride),
            image=resolved.image is not None,
        )
        return resolved

    def generate_batch(
        self,
        requests: list[WanRequest],
        callback: Callable[[int, int, float], None] | None = None,
        *,
        progress: bool = True,
        preview: PreviewCallback | None = None,
    ) -> list[Video]:
        """Generate several requests that share size, frames and schedule as one executor batch.

        Under torch.distributed (world > 1) a request without a seed gets rank 0's (:func:`shared_seed`)."""
        from wanpipe.parallel.mesh import shared_seed

        requests = [r if r.seed is not None else replace(r, seed=shared_seed(None)) for r in requests]
        contexts = [self.tokenizer.make_context(r) for r in requests]
        frames, timings = self.run_contexts(contexts, callback=callback, progress=progress, preview=preview)
        videos = []
        for ctx, f in zip(contexts, frames):
            videos.append(Video(f, ctx.fps, ctx.seed, asdict(timings), ctx.approximations.decoder))
        return videos

    def run_contexts(
        self,
        contexts: list[WanContext],
        callback: Callable[[int, int, float], None] | None = None,
        *,
        progress: bool = True,
        should_cancel: Callable[[], bool] | None = None,
        cancelled_rows: Callable[[], Collection[int]] | None = None,
        preview: PreviewCallback | None = None,
        sinks: Sequence[FrameSink] | None = None,
    ) -> tuple[list[Any], Timings]:
        """Run prepared contexts as one batch; returns each one's frames (F, H, W, 3) and the timings.
        ``sinks`` (one per context): the frames go into them as decoded, and a made row's entry is its
        sink (opened and written, for the caller to close); every sink is aborted if the batch fails.

        ``should_cancel()`` True stops the batch (:class:`~wanpipe.executor.CancelledError`);
        ``cancelled_rows()`` names contexts (indices into ``contexts``) whose work stops at the next
        step: their frames are None and their status CANCELLED. ``preview(Preview)``: live previews
        (``Preview.row`` indexes ``contexts``; each context's ``preview_every``)."""
        inputs = self.executor.prepare_inputs(contexts)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            steps = contexts[0].num_inference_steps * contexts[0].conditioning.segments
            bar = tqdm(total=steps, desc="denoising", unit="step")

        def on_step(i: int, n: int, t: float) -> None:
            if bar is not None:
                bar.update(1)
                if i == n - 1:
                    bar.close()  # the bar times the denoising steps only, not the decode
            if callback is not None:
                callback(i, n, t)

        try:
            plan = None if preview is None else PreviewPlan.of(preview, contexts)
            outputs = self.executor.execute(inputs, on_step, should_cancel, cancelled_rows, plan, sinks)
        except CancelledError:
            for ctx in contexts:
                ctx.status = GenerationStatus.CANCELLED
            raise
        except torch.OutOfMemoryError as e:
            for ctx in contexts:
                ctx.status = GenerationStatus.FAILED
            raise WanOutOfMemoryError(f"out of memory on {self.device}: {LOW_MEMORY_HINT} ({e})") from None
        except BaseException:
            for ctx in contexts:
                ctx.status = GenerationStatus.FAILED
            raise
        finally:
            if bar is not None:
                bar.close()
        frames = sinks if outputs.frames is None else outputs.frames.float().cpu().numpy()
        made = {row: frames[k if outputs.frames is not None else row] for k, row in enumerate(outputs.rows)}
        for i, ctx in enumerate(contexts):
            ctx.status = GenerationStatus.FINISHED if i in made else GenerationStatus.CANCELLED
        return [made.get(i) for i in range(len(contexts))], outputs.timings

    def __repr__(self) -> str:
        return f"WanPipeline({self.arch.path}, variant={self.arch.variant.name}, device={self.device}, dtype={self.dtype})"
