"""A job's spec and the engine: the server's limits checked on it, and the engine's request rebuilt from
it (at submit, and again in the worker, also after a restart, from the stored spec and uploads)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from wanpipe.context import InvalidRequestError, WanRequest
from wanpipe.presets import PRESETS
from wanpipe.serving.parsing import JobSpec, ServeLimits

if TYPE_CHECKING:
    from wanpipe.config import SamplingDefaults


class LimitExceededError(InvalidRequestError):
    """A request larger than the server's configured limits."""


def check_limits(
    defaults: SamplingDefaults, limits: ServeLimits, spec: JobSpec, video_frames: int | None = None
) -> None:
    """LimitExceededError (naming the field) for a job larger than this server allows: its size, frames
    or steps, the checkpoint's ``defaults`` filling what the spec leaves unset; ``video_frames``: a VACE
    control video's frames (its length is num_frames' default)."""
    d, lim = defaults, limits
    height = d.height if spec.height is None else spec.height
    width = d.width if spec.width is None else spec.width
    frames = d.num_frames if video_frames is None else video_frames
    frames = frames if spec.num_frames is None else spec.num_frames
    steps = d.num_inference_steps if spec.num_inference_steps is None else spec.num_inference_steps
    given = spec.sigmas if spec.sigmas is not None else spec.timesteps
    if given is not None:  # a schedule's list is one value per step
        steps = max(steps, len(given)) if spec.num_inference_steps is not None else len(given)
    elif spec.num_inference_steps is None and spec.preset in PRESETS:  # the preset's step list
        steps = PRESETS[spec.preset].num_inference_steps
    if height * width > lim.max_pixels:
        raise LimitExceededError(
            f"size {width}x{height} is {width * height} pixels; this server allows at most "
            f"{lim.max_pixels} (--max-pixels)",
            "height",
        )
    if frames > lim.max_frames:
        raise LimitExceededError(
            f"num_frames {frames} is more than this server allows ({lim.max_frames}, --max-frames)",
            "num_frames",
        )
    if steps > lim.max_steps:
        raise LimitExceededError(
            f"num_inference_steps {steps} is more than this server allows ({lim.max_steps}, --max-steps)",
            "num_inference_steps",
        )


def job_request(
    spec: JobSpec, image: Any, last_image: Any, inputs: Mapping[str, Any] | None = None
) -> WanRequest:
    """A job's request; ``inputs``: its uploaded videos by field name: VACE's video, mask and
    reference_images, Animate's driving videos."""
    vace = animate = inputs or {}
    return WanRequest(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        height=spec.height,
        width=spec.width,
        num_frames=spec.num_frames,
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        guidance_scale_2=spec.guidance_scale_2,
        flow_shift=spec.flow_shift,
        seed=spec.seed,
        image=image,
        last_image=last_image,
        sampler=spec.sampler,
        sigmas=None if spec.sigmas is None else list(spec.sigmas),
        timesteps=None if spec.timesteps is None else list(spec.timesteps),
        preset=spec.preset,
        video=vace.get("video"),
        mask=vace.get("mask"),
        reference_images=vace.get("reference_images"),
        conditioning_scale=spec.conditioning_scale,
        cache=spec.cache,
        cache_options=spec.cache_options,
        pose_video=animate.get("pose_video"),
        face_video=animate.get("face_video"),
        background_video=animate.get("background_video"),
        mask_video=animate.get("mask_video"),
        mode=spec.mode,
        segment_frame_length=spec.segment_frame_length,
        prev_segment_conditioning_frames=spec.prev_segment_conditioning_frames,
        context_frames=spec.context_frames,
        context_overlap=spec.context_overlap,
        context_schedule=spec.context_schedule,
        context_blend=spec.context_blend,
        decoder=spec.decoder,
        preview_every=spec.preview_every,
        prompts=None if spec.prompts is None else [tuple(r) for r in spec.prompts],  # type: ignore[misc]
    )


def batch_key_digest(key: tuple) -> str:
    """A stable text form of a batch key (``WanTokenizer.batch_key``) for the store: equal keys give
    equal digests."""
    return hashlib.sha256(repr(key).encode()).hexdigest()[:32]


def job_batch_key(key: tuple, loras: tuple[tuple[str, float], ...]) -> tuple:
    """A job's batch key: the engine's (``WanTokenizer.batch_key``) and its LoRA set, when it has one."""
    return (key, loras) if loras else key
