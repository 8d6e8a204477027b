"""Context windows' request side: ``context_frames``, ``context_overlap``, ``context_schedule`` and
``context_blend`` checked and filled in (docs/long-video.md).

:func:`resolve_windows` (called by :meth:`WanTokenizer.resolve <wanpipe.tokenizer.WanTokenizer.resolve>`)
validates them against the request's frame count and the checkpoint's mode; the denoise stage runs them
(:mod:`wanpipe.stages.windows`). Counts are in VIDEO frames here (``context_frames`` 4k+1,
``context_overlap`` a multiple of 4), latent frames in :class:`~wanpipe.context.ContextWindows`.
"""

from __future__ import annotations

from typing import Any

from wanpipe.config import WanArchConfig
from wanpipe.context import CONTEXT_BLENDS, CONTEXT_SCHEDULES, InvalidRequestError, WanRequest

WINDOW_FIELDS = ("context_frames", "context_overlap", "context_schedule", "context_blend")
DEFAULT_OVERLAP = 16
"""Video frames two windows share when context_overlap is not given (the reference's default), at most
half the window (rounded down to a multiple of the temporal stride), at least one latent frame."""


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
    return value


def resolve_windows(request: WanRequest, arch: WanArchConfig, num_frames: int) -> dict[str, Any]:
    """The request's window fields checked, defaults filled in: {context_frames, context_overlap,
    context_schedule, context_blend} (all None when ``context_frames`` is None: no windows).

    ``num_frames``: the video's frame count (resolved). Raises :class:`InvalidRequestError` naming the
    field: a window longer than the video, a count not of the form 4k+1 / not a multiple of 4, an
    overlap of 0 or not smaller than the window, an unknown schedule or blend, the other fields without
    ``context_frames``, a mode windows do not support yet (VACE, Animate, TI2V) or a step cache."""
    frames = request.context_frames
    if frames is None:
        for name in WINDOW_FIELDS[1:]:
            if getattr(request, name) is not None:
                raise InvalidRequestError(f"{name} needs context_frames (the window length)", name)
        return dict.fromkeys(WINDOW_FIELDS)
    stride = arch.temporal_stride
    frames = _integer(frames, "context_frames")
    if frames < 1 or (frames - 1) % stride:
        raise InvalidRequestError(
            f"context_frames must be {stride}k+1 video frames (e.g. 17, 33, 81), got {frames}",
            "context_frames",
        )
    if frames > num_frames:
        raise InvalidRequestError(
            f"context_frames ({frames}) must not be longer than the video (num_frames={num_frames})",
            "context_frames",
        )
    latent = (frames - 1) // stride + 1
    if request.context_overlap is None:
        overlap = max(stride, min(DEFAULT_OVERLAP, stride * ((latent - 1) // 2)))
    else:
        overlap = _integer(request.context_overlap, "context_overlap")
    if overlap <= 0 or overlap % stride or overlap // stride >= latent:
        raise InvalidRequestError(
            f"context_overlap must be a positive multiple of {stride} video frames smaller than the "
            f"window ({frames} frames: at most {stride * (latent - 1)}), got {overlap}",
            "context_overlap",
        )
    schedule = request.context_schedule or CONTEXT_SCHEDULES[0]
    if schedule not in CONTEXT_SCHEDULES:
        raise InvalidRequestError(
            f"context_schedule must be one of {', '.join(CONTEXT_SCHEDULES)}, got {schedule!r}",
            "context_schedule",
        )
    blend = request.context_blend or CONTEXT_BLENDS[0]
    if blend not in CONTEXT_BLENDS:
        raise InvalidRequestError(
            f"context_blend must be one of {', '.join(CONTEXT_BLENDS)}, got {blend!r}", "context_blend"
        )
    mode = (
        "VACE"
        if arch.accepts_vace
        else "Animate"
        if arch.accepts_animate
        else "TI2V (per-token timesteps)"
        if arch.expand_timesteps
        else None
    )
    if mode is not None:
        raise InvalidRequestError(
            f"context_frames: context windows support text-to-video and image-to-video (and video-to-"
            f"video) checkpoints, not {mode} yet",
            "context_frames",
        )
    if request.cache not in (None, "none") or request.residual_threshold is not None:
        name = "cache" if request.cache not in (None, "none") else "residual_threshold"
        raise InvalidRequestError(
            f"{name}: the step caches do not combine with context windows (each window is another input)",
            name,
        )
    return {
        "context_frames": frames,
        "context_overlap": overlap,
        "context_schedule": schedule,
        "context_blend": blend,
    }
