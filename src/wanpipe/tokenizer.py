"""WanTokenizer: validates a request and turns it into a WanContext (tokens, schedule, noise)."""

from __future__ import annotations

import logging
import math
import secrets
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

from wanpipe.config import WanArchConfig
from wanpipe.context import InvalidRequestError, WanContext, WanRequest
from wanpipe.media import OUTPUT_FORMATS
from wanpipe.models.text_encoder import WanTextTokenizer
from wanpipe.schedulers import make_schedule

logger = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1


def draw_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise exactly as diffusers draws it for ``generator=torch.Generator("cpu").manual_seed(seed)``."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
    if value < minimum:
        raise InvalidRequestError(f"{name} must be at least {minimum}, got {value}", name)
    return int(value)


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}", name)
    return float(value)


class WanTokenizer:
    """Request -> WanContext: validation, prompt tokens, schedule with step coefficients, noise."""

    def __init__(self, arch: WanArchConfig, text_tokenizer: WanTextTokenizer):
        self.arch = arch
        self.text_tokenizer = text_tokenizer

    async def new_context(self, request: WanRequest) -> WanContext:
        """MAX's entry point; the work is synchronous CPU work (see :meth:`make_context`)."""
        return self.make_context(request)

    def make_context(self, request: WanRequest) -> WanContext:
        arch, defaults = self.arch, self.arch.defaults
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise InvalidRequestError("prompt must be a non-empty string", "prompt")
        if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
            raise InvalidRequestError("negative_prompt must be a string", "negative_prompt")

        multiple = arch.spatial_multiple
        height = _int(defaults.height if request.height is None else request.height, "height", 1)
        width = _int(defaults.width if request.width is None else request.width, "width", 1)
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise InvalidRequestError(
                    f"{name} must be a positive multiple of {multiple} (VAE stride x patch size), got {value}",
                    name,
                )
        stride = arch.temporal_stride
        num_frames = _int(
            defaults.num_frames if request.num_frames is None else request.num_frames, "num_frames", 1
        )
        if (num_frames - 1) % stride:
            raise InvalidRequestError(
                f"num_frames must be {stride}k+1 (1, 5, 9, ..., 81), got {num_frames}", "num_frames"
            )
        steps = _int(
            defaults.num_inference_steps
            if request.num_inference_steps is None
            else request.num_inference_steps,
            "num_inference_steps",
            1,
        )
        guidance = _float(
            defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            "guidance_scale",
        )
        if guidance < 0:
            raise InvalidRequestError(f"guidance_scale must be >= 0, got {guidance}", "guidance_scale")
        flow_shift = arch.scheduler.flow_shift if request.flow_shift is None else request.flow_shift
        flow_shift = _float(flow_shift, "flow_shift")
        if flow_shift <= 0:
            raise InvalidRequestError(f"flow_shift must be > 0, got {flow_shift}", "flow_shift")
        seed = secrets.randbelow(2**31) if request.seed is None else _int(request.seed, "seed", 0)
        if seed > MAX_SEED:
            raise InvalidRequestError(f"seed must be at most {MAX_SEED}, got {seed}", "seed")
        if request.output_format not in OUTPUT_FORMATS:
            raise InvalidRequestError(
                f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {request.output_format!r}",
                "output_format",
            )

        shape = (
            arch.transformer.out_channels,
            (num_frames - 1) // stride + 1,
            height // arch.vae.spatial_stride,
            width // arch.vae.spatial_stride,
        )
        latents = self._latents(request.latents, seed, shape)

        do_cfg = guidance > 1.0
        prompts = [request.prompt] + ([request.negative_prompt or defaults.negative_prompt] if do_cfg else [])
        tokens = self.text_tokenizer(prompts)
        if tokens.truncated[0]:
            logger.warning(
                "the prompt is longer than %d tokens and was truncated (the reference does the same)",
                self.text_tokenizer.max_length,
            )
        schedule = make_schedule(arch.scheduler, steps, flow_shift=flow_shift)
        return WanContext(
            request_id=request.request_id,
            tokens=tokens.ids[0],
            mask=tokens.mask[0],
            negative_tokens=tokens.ids[1] if do_cfg else None,
            negative_mask=tokens.mask[1] if do_cfg else None,
            explicit_negative_prompt=request.negative_prompt is not None,
            timesteps=schedule.timesteps,
            sigmas=schedule.sigmas,
            step_coefficients=schedule.step_coefficients,
            latents=latents,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            flow_shift=flow_shift,
            seed=seed,
            output_format=request.output_format,
            fps=arch.defaults.fps,
        )

    @staticmethod
    def _latents(given: Any, seed: int, shape: tuple[int, ...]) -> np.ndarray:
        if given is None:
            return draw_noise(seed, (1, *shape))[0].numpy()
        array = given.detach().cpu().float().numpy() if isinstance(given, torch.Tensor) else np.asarray(given)
        if array.ndim == len(shape) + 1 and array.shape[0] == 1:
            array = array[0]
        if tuple(array.shape) != shape:
            raise InvalidRequestError(
                f"latents must have shape (1, {', '.join(map(str, shape))}) for this size and frame count, "
                f"got {tuple(np.shape(given))}",
                "latents",
            )
        if not np.isfinite(array).all():
            raise InvalidRequestError("latents must be finite", "latents")
        return np.ascontiguousarray(array, dtype=np.float32)
