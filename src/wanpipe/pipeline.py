"""WanPipeline: the front door for Python users (from_pretrained + generate)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wanpipe.config import WanArchConfig
from wanpipe.context import GenerationStatus, WanContext, WanRequest
from wanpipe.executor import Experts, Timings, WanExecutor
from wanpipe.media import Video
from wanpipe.models.image_encoder import (
    WanImageEncoder,
    build_clip_vision,
    clip_key_map,
    materialize_clip_buffers,
)
from wanpipe.models.text_encoder import (
    TEXT_ENCODER_ALIASES,
    WanTextEncoder,
    WanTextTokenizer,
    build_text_encoder,
    text_encoder_fp32_patterns,
)
from wanpipe.models.transformer import TransformerConfig, WanTransformerModel
from wanpipe.models.vae import WanVAE
from wanpipe.tokenizer import WanTokenizer
from wanpipe.weights.loader import load_weights, open_component_weights, resolve_checkpoint
from wanpipe.weights.transformer_keys import TRANSFORMER_DIFFUSERS_IGNORED

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

LOW_MEMORY_HINT = (
    "lower the memory needed with a smaller --height/--width, fewer --num-frames, "
    "--dtype bfloat16 on a GPU, or --device cpu"
)


class WanOutOfMemoryError(RuntimeError):
    """Generation ran out of device memory; the message names the options that lower memory."""


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> bf16 on CUDA, fp32 elsewhere; strings as in ``DTYPES``."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        vae_dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        experts: str = "resident",
    ) -> WanPipeline:
        """Load a diffusers-layout Wan checkpoint from a local folder or a hub id.

        ``dtype`` is the DiT's and text encoder's (default bf16 on CUDA, fp32 on CPU); the VAE runs in
        ``vae_dtype`` (default fp32, as the reference recommends). ``experts`` (Wan 2.2 A14B): "resident"
        keeps both experts loaded; "swap" keeps one set of DiT modules and copies the other expert's
        weights into it at the switch (half the DiT memory; the same frames).
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = parse_dtype(dtype, device)
        vae_dtype = parse_dtype(vae_dtype, torch.device("cpu"))
        if experts not in ("resident", "swap"):
            raise ValueError(f"experts must be 'resident' or 'swap', got {experts!r}")
        folder = resolve_checkpoint(path_or_id, revision=revision, cache_dir=cache_dir)
        arch = WanArchConfig.from_folder(folder)

        t0 = time.perf_counter()
        text_tokenizer = WanTextTokenizer(folder / "tokenizer", max_length=arch.get_max_seq_len())
        encoder = build_text_encoder(arch.text_encoder)
        load_weights(
            encoder,
            open_component_weights(folder, "text_encoder"),
            component="text_encoder",
            dtype=dtype,
            device=device,
            keep_in_fp32=text_encoder_fp32_patterns(dtype),
            aliases=TEXT_ENCODER_ALIASES,
        )

        def dit(name: str, config: TransformerConfig) -> WanTransformerModel:
            with torch.device("meta"):
                model = WanTransformerModel(config)
            return load_weights(
                model,
                open_component_weights(folder, name),
                component=name,
                dtype=dtype,
                device=device,
                prepare=WanTransformerModel.prepare_state_dict,
                keep_in_fp32=WanTransformerModel.keep_in_fp32,
                ignore_unexpected=TRANSFORMER_DIFFUSERS_IGNORED,
            )

        transformer: WanTransformerModel | Experts = dit("transformer", arch.transformer)
        if arch.transformer_2 is not None:
            if experts == "resident":
                transformer = Experts(transformer, dit("transformer_2", arch.transformer_2))
            else:
                # Fresh mappings: the resident module's tensors must not alias the states it swaps in.
                states = {
                    which: WanTransformerModel.prepare_state_dict(open_component_weights(folder, name))
                    for which, name in (("high", "transformer"), ("low", "transformer_2"))
                }
                transformer = Experts(transformer, swap_states=states)

        with torch.device("meta"):
            vae = WanVAE(arch.vae)
        load_weights(
            vae,
            open_component_weights(folder, "vae"),
            component="vae",
            dtype=vae_dtype,
            device=device,
            prepare=WanVAE.prepare_state_dict,
        )
        image_encoder = None
        if arch.image_encoder is not None and arch.transformer.image_dim is not None:
            vision = build_clip_vision(arch.image_encoder)
            load_weights(
                vision,
                open_component_weights(folder, "image_encoder"),
                component="image_encoder",
                dtype=dtype,
                device=device,
                prepare=clip_key_map(vision),
                materialize=materialize_clip_buffers,
            )
            image_encoder = WanImageEncoder(vision)
        logger.info("loaded %s (%s) in %.1f s", folder, arch.variant.name, time.perf_counter() - t0)
        executor = WanExecutor(
            WanTextEncoder(encoder),
            transformer,
            vae,
            image_encoder=image_encoder,
            expand_timesteps=arch.expand_timesteps,
            device=device,
            dtype=dtype,
            vae_dtype=vae_dtype,
        )
        return cls(arch, WanTokenizer(arch, text_tokenizer), executor)

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
        progress: bool = True,
    ) -> Video:
        """Generate one video. Values left ``None`` take the checkpoint family's defaults.

        Returns a :class:`~wanpipe.media.Video` whose ``frames`` are (F, H, W, 3) float32 in [0, 1].
        ``callback(step, num_steps, timestep)`` is called after every denoising step. ``image`` (and
        ``last_image``) condition image-to-video checkpoints; ``video`` with ``strength`` re-noises a
        video (video-to-video); ``guidance_scale_2`` is the low-noise expert's (Wan 2.2 A14B). Images
        and videos are paths, PIL images or uint8 arrays.
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
        )
        return self.generate_batch([request], callback=callback, progress=progress)[0]

    def generate_batch(
        self,
        requests: list[WanRequest],
        callback: Callable[[int, int, float], None] | None = None,
        *,
        progress: bool = True,
    ) -> list[Video]:
        """Generate several requests that share size, frames and schedule as one executor batch."""
        contexts = [self.tokenizer.make_context(r) for r in requests]
        frames, timings = self.run_contexts(contexts, callback=callback, progress=progress)
        videos = []
        for ctx, f in zip(contexts, frames):
            videos.append(Video(frames=f, fps=ctx.fps, seed=ctx.seed, timings=asdict(timings)))
        return videos

    def run_contexts(
        self,
        contexts: list[WanContext],
        callback: Callable[[int, int, float], None] | None = None,
        *,
        progress: bool = True,
        should_cancel: Callable[[], bool] | None = None,
    ) -> tuple[list[np.ndarray], Timings]:
        """Run prepared contexts as one batch; returns each one's frames (F, H, W, 3) and the timings."""
        inputs = self.executor.prepare_inputs(contexts)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=contexts[0].num_inference_steps, desc="denoising", unit="step")

        def on_step(i: int, n: int, t: float) -> None:
            if bar is not None:
                bar.update(1)
                if i == n - 1:
                    bar.close()  # the bar times the denoising steps only, not the decode
            if callback is not None:
                callback(i, n, t)

        try:
            outputs = self.executor.execute(inputs, callback=on_step, should_cancel=should_cancel)
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
        frames = outputs.frames.float().cpu().numpy()
        for ctx in contexts:
            ctx.status = GenerationStatus.FINISHED
        return list(frames), outputs.timings

    def __repr__(self) -> str:
        return f"WanPipeline({self.arch.path}, variant={self.arch.variant.name}, device={self.device}, dtype={self.dtype})"
