"""WanTokenizer: validates a request and turns it into a WanContext (tokens, schedule, noise).

The checkpoint's UMT5 tokenizer files are read by :class:`~wanpipe.text_tokenizer.WanTextTokenizer`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from dataclasses import replace
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from PIL import Image

from wanpipe.animate_request import (
    animate_conditioning,
    animate_latent_shape,
    face_size,
    read_animate,
    refuse_animate,
    resolve_animate,
    segment_noise,
    segment_plan,
)
from wanpipe.config import WanArchConfig
from wanpipe.context import (
    Approximations,
    ConditioningInputs,
    InvalidRequestError,
    WanContext,
    WanRequest,
    resolve_decoder,
    resolve_preview_every,
)
from wanpipe.media import OUTPUT_FORMATS, read_image, read_video
from wanpipe.models.image_encoder import clip_preprocess
from wanpipe.presets import apply_preset
from wanpipe.prompt_travel import make_travel, resolve_prompts
from wanpipe.schedulers import SAMPLERS, TIMESTEP_SCALE, generator_state, make_schedule, seeded_generator
from wanpipe.text_tokenizer import WanTextTokenizer
from wanpipe.vace_request import refuse_vace, resolve_vace, vace_conditioning
from wanpipe.window_request import WINDOW_FIELDS, resolve_windows

logger = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1


def draw_noise(seed: int, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """The initial noise exactly as diffusers draws it for ``generator=torch.Generator("cpu").manual_seed(seed)``
    (``generator``: that generator, to go on drawing from it after the initial noise)."""
    generator = seeded_generator(seed) if generator is None else generator
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


def _optional_fraction(value: Any, name: str, upper: float) -> float | None:
    """None, or a number in [0, upper] (the step-cache threshold, the guidance fraction)."""
    if value is None:
        return None
    value = _float(value, name)
    if not 0.0 <= value <= upper:
        raise InvalidRequestError(f"{name} must be in [0, {upper:g}], got {value}", name)
    return value


def _step_list(value: Any, name: str, upper: float) -> list[float] | None:
    """None, or a request's ``sigmas`` / ``timesteps``: a non-empty list of numbers in (0, upper],
    strictly decreasing, returned as a list of floats."""
    if value is None:
        return None
    if isinstance(value, np.ndarray | torch.Tensor) and value.ndim == 1:
        value = value.tolist()
    if not isinstance(value, list | tuple) or not value:
        raise InvalidRequestError(
            f"{name} must be a non-empty list of numbers (one per step), got {value!r}", name
        )
    values = [_float(v, name) for v in value]
    for v in values:
        if not 0.0 < v <= upper:
            raise InvalidRequestError(f"{name} must each be in (0, {upper:g}], got {v:g}", name)
    for a, b in zip(values, values[1:]):
        if b >= a:
            raise InvalidRequestError(f"{name} must be strictly decreasing, got {a:g} then {b:g}", name)
    return values


class WanTokenizer:
    """Request -> WanContext: validation, prompt tokens, schedule with step coefficients, noise.

    Two steps, so that a server can do the first at submit time and the second in its worker:
    :meth:`resolve` validates a request and fills in every default (seed drawn, images and video read),
    without tokens or noise; :meth:`make_context` turns a (resolved or not) request into its context.
    """

    def __init__(self, arch: WanArchConfig, text_tokenizer: WanTextTokenizer):
        self.arch = arch
        self.text_tokenizer = text_tokenizer

    async def new_context(self, request: WanRequest) -> WanContext:
        """MAX's entry point; the work is synchronous CPU work (see :meth:`make_context`)."""
        return self.make_context(request)

    # -- resolve: validate and fill in ------------------------------------------------------------
    def resolve(self, request: WanRequest) -> WanRequest:
        """Validate ``request`` and fill in every default: a request with every size, step count,
        guidance, shift and seed set (a seed drawn when none is given), images read into uint8 arrays
        and a video into a uint8 (F, H, W, 3) array, its frame count settled (VACE checkpoints: video,
        mask, reference_images and conditioning_scale by :func:`~wanpipe.vace_request.resolve_vace`).
        No tokens, no noise.

        Raises :class:`InvalidRequestError` naming the field. Resolving a resolved request gives it back
        unchanged (the same values, the same seed). A ``preset`` fills the values left None first
        (:func:`wanpipe.presets.apply_preset`)."""
        request = apply_preset(request, self.arch)
        arch, defaults = self.arch, self.arch.defaults
        if arch.accepts_animate:  # the driving videos read; the size taken from the pose video
            request = read_animate(request, arch)
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
        if (num_frames - 1) % stride and not arch.accepts_animate:  # Animate: any length, in segments
            raise InvalidRequestError(
                f"num_frames must be {stride}k+1 (1, 5, 9, ..., 81), got {num_frames}", "num_frames"
            )
        sampler, sigmas, timesteps = self._sampling(request)
        given = sigmas if sigmas is not None else timesteps
        if request.num_inference_steps is None and given is not None:
            steps = len(given)
        else:
            steps = _int(
                defaults.num_inference_steps
                if request.num_inference_steps is None
                else request.num_inference_steps,
                "num_inference_steps",
                1,
            )
        if given is not None and len(given) != steps:
            name = "sigmas" if sigmas is not None else "timesteps"
            raise InvalidRequestError(
                f"{name} must have one value per step: num_inference_steps={steps}, got {len(given)} values "
                "(leave num_inference_steps out to take the list's length)",
                name,
            )
        guidance = _float(
            defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            "guidance_scale",
        )
        if guidance < 0:
            raise InvalidRequestError(f"guidance_scale must be >= 0, got {guidance}", "guidance_scale")
        flow_shift = (
            arch.default_flow_shift(height, width) if request.flow_shift is None else request.flow_shift
        )
        flow_shift = _float(flow_shift, "flow_shift")
        if flow_shift <= 0:
            raise InvalidRequestError(f"flow_shift must be > 0, got {flow_shift}", "flow_shift")
        seed = secrets.randbelow(2**31) if request.seed is None else _int(request.seed, "seed", 0)
        if seed > MAX_SEED:
            raise InvalidRequestError(f"seed must be at most {MAX_SEED}, got {seed}", "seed")
        decoder = resolve_decoder(request.decoder)
        if request.output_format not in OUTPUT_FORMATS:
            raise InvalidRequestError(
                f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {request.output_format!r}",
                "output_format",
            )
        if arch.accepts_vace:  # video is the control video there (wanpipe.vace_request)
            media, strength = resolve_vace(request, arch, num_frames, height, width), None
        elif arch.accepts_animate:  # image is the character there (wanpipe.animate_request)
            media, strength = resolve_animate(request, arch, height, width), None
        else:
            refuse_vace(request, arch)
            media, strength = self._media(request, num_frames), self._strength(request, steps)
        if not arch.accepts_animate:
            refuse_animate(request, arch)
        references = len(media.get("reference_images") or ())
        shape = (
            animate_latent_shape(arch, media["segment_frame_length"], height, width)
            if arch.accepts_animate
            else None
        )
        latents = (
            None
            if request.latents is None
            else self._latents(request.latents, media["num_frames"], height, width, references, shape)
        )
        return replace(
            request,
            latents=latents,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            guidance_scale_2=self._guidance_2(request, guidance),
            flow_shift=flow_shift,
            seed=seed,
            strength=strength,
            residual_threshold=_optional_fraction(request.residual_threshold, "residual_threshold", 1e9),
            cfg_truncation=_optional_fraction(request.cfg_truncation, "cfg_truncation", 1.0),
            sampler=sampler,
            sigmas=sigmas,
            timesteps=timesteps,
            decoder=decoder,
            preview_every=resolve_preview_every(request.preview_every),
            **self._cache(request, height, width, media),
            **media,
            **resolve_windows(request, arch, media["num_frames"]),
            **resolve_prompts(request, media["num_frames"]),
        )

    def _sampling(self, request: WanRequest) -> tuple[str, list[float] | None, list[float] | None]:
        """The request's sampler (the checkpoint's when none is given) and its own sigmas or timesteps."""
        sampler = self.arch.scheduler.kind if request.sampler is None else request.sampler
        if sampler not in SAMPLERS:
            raise InvalidRequestError(
                f"sampler must be one of {', '.join(SAMPLERS)}, got {request.sampler!r}", "sampler"
            )
        if sampler in ("lcm", "dmd") and self.arch.accepts_animate:
            raise InvalidRequestError(
                f"sampler {sampler} (fresh noise at each step) is not available on Wan2.2-Animate checkpoints "
                "yet: use unipc or euler",
                "sampler",
            )
        sigmas = _step_list(request.sigmas, "sigmas", 1.0)
        timesteps = _step_list(request.timesteps, "timesteps", TIMESTEP_SCALE)
        if sigmas is not None and timesteps is not None:
            raise InvalidRequestError(
                "give either sigmas or timesteps (timesteps = 1000 * sigmas), not both", "timesteps"
            )
        return sampler, sigmas, timesteps

    def _cache(self, request: WanRequest, height: int, width: int, media: dict[str, Any]) -> dict[str, Any]:
        """The request's step cache and its options, checked, every default (and the model's
        published MagCache ratios) filled in: {"cache", "cache_options"}; None and None for the
        runtime options' cache."""
        from wanpipe.runtime.cache_options import cache_name, complete_cache_options, resolve_cache_options

        name = cache_name(request.cache)
        given = request.cache_options
        if name in (None, "none"):
            if given:
                raise InvalidRequestError(
                    "cache_options needs cache (the step cache they configure): one of first-block, "
                    "teacache, taylorseer, magcache",
                    "cache_options",
                )
            return {"cache": name, "cache_options": None}
        threshold = request.residual_threshold
        if threshold is not None:
            if name == "taylorseer":
                raise InvalidRequestError(
                    "residual_threshold: TaylorSeer has no threshold (its options are cache_interval, "
                    "disable_cache_before_step, disable_cache_after_step, max_order)",
                    "residual_threshold",
                )
            if given is None or "threshold" not in given:
                given = {**(given or {}), "threshold": threshold}
        options = resolve_cache_options(name, given)
        arch, stride = self.arch, self.arch.vae.spatial_stride
        options = complete_cache_options(
            name,
            options,
            dit=arch.transformer,
            two_experts=arch.has_second_expert,
            per_token_timesteps=arch.expand_timesteps,
            image="image" in media,
            latent_size=(height // stride, width // stride),
        )
        return {"cache": name, "cache_options": options}

    def batch_key(self, request: WanRequest) -> tuple:
        """What requests must share to run as one executor batch, from a :meth:`resolve`'d request:
        equal keys give contexts with equal :attr:`WanContext.batch_key`."""
        return (
            request.height,
            request.width,
            request.num_frames,
            request.num_inference_steps,
            request.flow_shift,
            request.strength,
            request.image is not None,
            request.last_image is not None,
            request.video is not None,
            request.residual_threshold,
            request.cfg_truncation,
            request.sampler,
            None if request.sigmas is None else tuple(request.sigmas),
            None if request.timesteps is None else tuple(request.timesteps),
            request.mask is not None,
            len(request.reference_images or ()),
            request.cache,
            None if request.cache_options is None else json.dumps(request.cache_options, sort_keys=True),
            request.mode,
            request.segment_frame_length,
            request.prev_segment_conditioning_frames,
            *(getattr(request, name) for name in WINDOW_FIELDS),
            request.decoder,
            None if request.prompts is None else tuple(tuple(r) for r in request.prompts),
        )

    def _media(self, request: WanRequest, num_frames: int) -> dict[str, Any]:
        """Validate image / last_image / video against the checkpoint and read them: the request's
        ``image``, ``last_image`` (uint8 (H, W, 3)), ``video`` (uint8 (F, H, W, 3)) and ``num_frames``."""
        arch, name = self.arch, self.arch.variant.name
        out: dict[str, Any] = {"num_frames": num_frames}
        if request.image is None and request.last_image is not None:
            raise InvalidRequestError("last_image needs image (the first frame) too", "last_image")
        if request.image is not None:
            if not arch.accepts_image:
                raise InvalidRequestError(
                    f"this {name} checkpoint is text-to-video only and takes no image; use an image-to-video "
                    "checkpoint (Wan2.1-I2V, FLF2V, Wan2.2-I2V-A14B or TI2V-5B)",
                    "image",
                )
            if request.video is not None:
                raise InvalidRequestError(
                    "give either image (image-to-video) or video (video-to-video)", "video"
                )
        elif arch.takes_image:
            raise InvalidRequestError(
                f"this {name} checkpoint is image-to-video: pass image (the first frame)", "image"
            )
        if request.last_image is not None and not arch.accepts_last_image:
            raise InvalidRequestError(
                f"this {name} checkpoint cannot take last_image (first-last-frame needs an FLF2V checkpoint "
                "or Wan2.2-I2V-A14B)",
                "last_image",
            )
        if (
            arch.transformer.pos_embed_seq_len is not None
            and request.last_image is None
            and request.image is not None
        ):
            raise InvalidRequestError(
                f"this {name} checkpoint is first-last-frame: pass last_image too", "last_image"
            )
        if request.image is not None:
            out["image"] = _read_image(request.image, "image")
        if request.last_image is not None:
            out["last_image"] = _read_image(request.last_image, "last_image")
        if request.strength is not None and request.video is None:
            raise InvalidRequestError("strength is for video-to-video: pass video too", "strength")
        if request.video is not None:
            if arch.variant.task != "t2v":
                raise InvalidRequestError(
                    f"video-to-video runs on text-to-video checkpoints, not on this {name} checkpoint",
                    "video",
                )
            frames = _read_video(request.video)
            stride = arch.temporal_stride
            if request.num_frames is None:
                num_frames = (len(frames) - 1) // stride * stride + 1
            if len(frames) < num_frames:
                raise InvalidRequestError(
                    f"the video has {len(frames)} frames, fewer than num_frames={num_frames}", "video"
                )
            out["num_frames"] = num_frames
            out["video"] = frames[:num_frames]
        return out

    def _guidance_2(self, request: WanRequest, guidance: float) -> float | None:
        """The low-noise expert's guidance (Wan 2.2 A14B), else None."""
        arch = self.arch
        if not arch.has_second_expert:
            if request.guidance_scale_2 is not None:
                raise InvalidRequestError(
                    f"guidance_scale_2 is for checkpoints with two experts (Wan2.2 A14B); this "
                    f"{arch.variant.name} checkpoint has one",
                    "guidance_scale_2",
                )
            return None
        if request.guidance_scale_2 is not None:
            guidance_2 = _float(request.guidance_scale_2, "guidance_scale_2")
        elif request.guidance_scale is None and arch.defaults.guidance_scale_2 is not None:
            guidance_2 = arch.defaults.guidance_scale_2
        else:  # as the reference: the low-noise expert takes guidance_scale when none is given
            guidance_2 = guidance
        if guidance_2 < 0:
            raise InvalidRequestError(f"guidance_scale_2 must be >= 0, got {guidance_2}", "guidance_scale_2")
        return guidance_2

    @staticmethod
    def _strength(request: WanRequest, steps: int) -> float | None:
        """Video-to-video: the strength (default 0.8), checked to run at least one step; else None."""
        if request.video is None:
            return None
        strength = 0.8 if request.strength is None else _float(request.strength, "strength")
        if not 0.0 < strength <= 1.0:
            raise InvalidRequestError(f"strength must be in (0, 1], got {strength}", "strength")
        if min(int(steps * strength), steps) < 1:
            raise InvalidRequestError(
                f"strength {strength} with {steps} steps runs no step: use strength >= 1/{steps} or more steps",
                "strength",
            )
        return strength

    # -- make_context: tokens, schedule, noise, pixels -------------------------------------------
    def make_context(self, request: WanRequest) -> WanContext:
        """Resolve ``request`` (:meth:`resolve`) and make its context: the prompts' token ids, the
        schedule, the initial noise from the seed, the images and video as the executor takes them."""
        r = self.resolve(request)
        arch = self.arch
        assert r.height is not None and r.width is not None and r.num_frames is not None
        assert r.num_inference_steps is not None and r.guidance_scale is not None and r.seed is not None
        conditioning = self._conditioning(r)
        generator = None
        if arch.accepts_animate:  # a draw per segment from one generator, as diffusers
            assert r.segment_frame_length is not None and r.prev_segment_conditioning_frames is not None
            shape = animate_latent_shape(arch, r.segment_frame_length, r.height, r.width)
            _, segments = segment_plan(
                r.num_frames, r.segment_frame_length, r.prev_segment_conditioning_frames
            )
            noise = segment_noise(r.seed, shape, segments, r.latents)
            latents = noise[0]
            conditioning = replace(conditioning, segment_noise=noise[1:] if segments > 1 else None)
        else:
            shape = self.latent_shape(r.num_frames, r.height, r.width, len(r.reference_images or ()))
            # One noise stream per request: the initial latents, then (LCM, DMD) each step's fresh noise.
            generator = seeded_generator(r.seed)
            latents = (
                draw_noise(r.seed, (1, *shape), generator)[0].numpy() if r.latents is None else r.latents
            )

        do_cfg = r.guidance_scale > 1.0
        prompts = [r.prompt] + ([r.negative_prompt or arch.defaults.negative_prompt] if do_cfg else [])
        tokens = self.text_tokenizer(prompts)
        if tokens.truncated[0]:
            logger.warning(
                "the prompt is longer than %d tokens and was truncated (the reference does the same)",
                self.text_tokenizer.max_length,
            )
        steps = r.num_inference_steps
        # Video-to-video starts partly noised: the schedule's tail, as the reference derives it.
        # A request's own sigmas / timesteps are the full schedule: strength keeps its tail alike.
        start_step = 0 if r.strength is None else steps - min(int(steps * r.strength), steps)
        schedule = make_schedule(
            arch.scheduler,
            steps,
            flow_shift=r.flow_shift,
            start_step=start_step,
            sampler=r.sampler,
            sigmas=r.sigmas,
            timesteps=r.timesteps,
        )
        return WanContext(
            request_id=r.request_id,
            tokens=tokens.ids[0],
            mask=tokens.mask[0],
            negative_tokens=tokens.ids[1] if do_cfg else None,
            negative_mask=tokens.mask[1] if do_cfg else None,
            explicit_negative_prompt=r.negative_prompt is not None,
            schedule=schedule,
            latents=latents,
            height=r.height,
            width=r.width,
            num_frames=r.num_frames,
            num_inference_steps=steps,
            guidance_scale=r.guidance_scale,
            flow_shift=r.flow_shift,  # type: ignore[arg-type]
            seed=r.seed,
            fps=arch.defaults.fps,
            guidance_scale_2=r.guidance_scale_2,
            boundary_timestep=arch.boundary_timestep if arch.has_second_expert else None,
            conditioning=conditioning,
            approximations=Approximations.of(r),
            noise_state=generator_state(generator) if generator is not None and schedule.stochastic else None,
            preview_every=r.preview_every,
            prompt_travel=make_travel(
                r, self.text_tokenizer, (r.num_frames - 1) // arch.temporal_stride + 1, arch.temporal_stride
            ),
        )

    def _conditioning(self, r: WanRequest) -> ConditioningInputs:
        """A resolved request's images and video, preprocessed as the reference does."""
        arch = self.arch
        condition = clip = video = None
        if arch.accepts_animate:
            animate = animate_conditioning(r, face_size(arch))
            clip = clip_preprocess([r.image], arch.image_processor).numpy() if arch.image_processor else None
            return ConditioningInputs(clip_pixels=clip, **animate)
        if r.image is not None:
            images = [r.image] + ([r.last_image] if r.last_image is not None else [])
            condition = np.stack([_to_pixels(im, r.height, r.width) for im in images])
            if arch.image_processor is not None and arch.transformer.image_dim is not None:
                clip = clip_preprocess(images, arch.image_processor).numpy()
        if arch.accepts_vace:
            return ConditioningInputs(**vace_conditioning(r, arch.vae.spatial_stride))
        if r.video is not None:
            video = np.stack([_to_pixels(f, r.height, r.width) for f in r.video], axis=1)
        return ConditioningInputs(condition, clip, video, r.strength)

    def latent_shape(
        self, num_frames: int, height: int, width: int, reference_frames: int = 0
    ) -> tuple[int, int, int, int]:
        """(C, f, h, w): the latents of a video of this size (VACE: one more frame per reference image,
        put first)."""
        arch = self.arch
        return (
            arch.transformer.out_channels,
            (num_frames - 1) // arch.temporal_stride + 1 + reference_frames,
            height // arch.vae.spatial_stride,
            width // arch.vae.spatial_stride,
        )

    def _latents(
        self,
        given: Any,
        num_frames: int,
        height: int,
        width: int,
        reference_frames: int = 0,
        shape: tuple[int, ...] | None = None,
    ) -> np.ndarray:
        """Given initial latents (C, f, h, w) or (1, C, f, h, w) -> checked float32 (C, f, h, w)
        (``shape``: another shape than the video's, e.g. one Animate segment's)."""
        shape = shape or self.latent_shape(num_frames, height, width, reference_frames)
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


def _read_image(value: Any, param: str) -> np.ndarray:
    """A path, PIL image or array -> uint8 (H, W, 3); unreadable input is an InvalidRequestError."""
    try:
        return read_image(value)
    except (OSError, ValueError, TypeError) as e:
        raise InvalidRequestError(f"{param}: cannot read the image ({e})", param) from None


def _read_video(value: Any) -> np.ndarray:
    """A path, a list of frames or an (F, H, W, 3) array -> uint8 (F, H, W, 3)."""
    try:
        if isinstance(value, str | os.PathLike):
            frames, _ = read_video(value)
            return frames
        if isinstance(value, np.ndarray) and value.ndim == 4:
            return np.stack([read_image(f) for f in value])
        if isinstance(value, list | tuple) and value:
            return np.stack([read_image(f) for f in value])
    except (OSError, ValueError, TypeError) as e:
        raise InvalidRequestError(f"video: cannot read the video ({e})", "video") from None
    raise InvalidRequestError("video must be a file path, a list of frames or an (F, H, W, 3) array", "video")


def _to_pixels(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H0, W0, 3) -> float32 (3, height, width) in [-1, 1], resized as the reference does
    (PIL Lanczos to the target size, then x / 255 * 2 - 1)."""
    resized = Image.fromarray(image).resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(resized).astype(np.float32) / 255.0
    return np.ascontiguousarray((2.0 * pixels - 1.0).transpose(2, 0, 1))
