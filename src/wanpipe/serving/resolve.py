"""A parsed request made a job: checked against the server's limits and the model, every default filled in
by the engine (the seed drawn), its batch key computed, its uploads as the engine resolved them.

One function, used where the model lives: at submit in a server that runs the model (``--role all``), and
in a worker for the jobs an API replica (``--role api``, no model) queued unresolved
(:mod:`wanpipe.serving.roles`)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from wanpipe.context import InvalidRequestError
from wanpipe.serving.job_request import batch_key_digest, check_limits, job_batch_key, job_request

if TYPE_CHECKING:
    import numpy as np

    from wanpipe.pipeline import WanPipeline
    from wanpipe.serving.parsing import JobSpec, NewJob, ServeLimits


def resolve_job(
    pipe: WanPipeline, limits: ServeLimits, new: NewJob
) -> tuple[JobSpec, str, dict[str, np.ndarray]]:
    """(the resolved spec, its batch key digest, the uploads to store by name: uint8 arrays). Raises
    InvalidRequestError (LimitExceededError) naming the field."""
    if not new.animate_videos:  # Animate: size and length come from the pose video, checked below
        check_limits(pipe.arch.defaults, limits, new.spec, None if new.video is None else len(new.video))
    if new.video is not None and not pipe.arch.accepts_vace:
        raise InvalidRequestError(
            f"video is the control video of VACE checkpoints; this server's {pipe.arch.variant.name} "
            "checkpoint has no VACE blocks",
            "video",
        )
    # The engine validates the rest (an image on a text-to-video model, ...) and fills in every
    # default, the seed drawn: the stored spec makes the same video after a restart. No tokens, no
    # noise here: the worker makes the contexts, once. (check: resolve, and what the pipeline cannot
    # run with it, such as a step cache on a parallel run.)
    vace = {"video": new.video, "mask": new.mask, "reference_images": list(new.reference_images) or None}
    animate = dict(new.animate_videos or {})
    resolved = pipe.check(job_request(new.spec, new.image, new.last_image, {**vace, **animate}))
    spec = replace(
        new.spec,
        height=resolved.height,
        width=resolved.width,
        num_frames=resolved.num_frames,
        num_inference_steps=resolved.num_inference_steps,
        guidance_scale=resolved.guidance_scale,
        guidance_scale_2=resolved.guidance_scale_2,
        flow_shift=resolved.flow_shift,
        seed=resolved.seed,
        fps=new.spec.fps if new.spec.fps is not None else float(pipe.arch.defaults.fps),
        sampler=resolved.sampler,
        # the schedule's list as resolved: the request's own, or its preset's (which the worker, taking
        # the stored spec, would not fill in again once the step count is set)
        sigmas=None if resolved.sigmas is None else tuple(resolved.sigmas),
        timesteps=None if resolved.timesteps is None else tuple(resolved.timesteps),
        conditioning_scale=resolved.conditioning_scale,
        cache=resolved.cache,
        mode=resolved.mode,
        segment_frame_length=resolved.segment_frame_length,
        prev_segment_conditioning_frames=resolved.prev_segment_conditioning_frames,
        preview_every=resolved.preview_every,
    )
    if animate:
        check_limits(pipe.arch.defaults, limits, spec)
    batch_key = batch_key_digest(job_batch_key(pipe.tokenizer.batch_key(resolved), spec.loras))
    images = {
        "image": new.image,
        "last_image": new.last_image,
        "video": resolved.video,
        "mask": resolved.mask,
    }
    # VACE's inputs and Animate's videos are kept as the engine resolved them (resized): the same
    # video after a restart
    for i, reference in enumerate(resolved.reference_images or ()):
        images[f"reference_image.{i}"] = reference
    images.update({name: getattr(resolved, name) for name in animate})
    return spec, batch_key, {k: v for k, v in images.items() if v is not None}
