"""Typed messages between the layers: a request at the edge, one request's context inside.

``WanRequest`` is what a user (Python, CLI or HTTP) asks for, with ``None`` for "use the default".
``WanContext`` is one validated request's state as the executor consumes it: token ids, the schedule
with its precomputed step coefficients, the initial noise, the resolved sizes, the preprocessed
images/video (:class:`ConditioningInputs`), the opt-in approximations (:class:`Approximations`) and
the status.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wanpipe.schedulers import Schedule


class GenerationStatus(enum.StrEnum):
    ACTIVE = "active"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class InvalidRequestError(ValueError):
    """A request value that is not allowed; ``param`` names the field (for HTTP error bodies)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class WanRequest:
    """One generation request. ``None`` means the checkpoint family's default."""

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    seed: int | None = None
    latents: np.ndarray | None = None  # (1, C, f, h, w) or (C, f, h, w) float32 initial noise
    guidance_scale_2: float | None = None  # the low-noise expert's guidance (Wan 2.2 A14B)
    image: Any = None  # image-to-video: a path, PIL image or (H, W, 3) array
    last_image: Any = None  # first-last-frame: the last frame
    video: Any = None  # video-to-video: a path or (F, H, W, 3) array
    strength: float | None = None  # video-to-video: how much of the input video is re-noised
    output_format: str = "mp4"
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Opt-in approximations (wanpipe.runtime): None = the runtime options' default (off unless set).
    residual_threshold: float | None = None  # step cache: skip the DiT while its input changes less
    cfg_truncation: float | None = None  # stop guidance after this fraction of the steps
    # Wan2.2-Animate (docs/animate.md); there ``image`` is the character. Videos are paths, lists of
    # frames or (F, H, W, 3) uint8 arrays, as the original repository's preprocessing writes them.
    pose_video: Any = None  # the driving video's skeleton frames (src_pose.mp4)
    face_video: Any = None  # the driving face, cropped, one frame per pose frame (src_face.mp4)
    background_video: Any = None  # replace mode: the driving video without its person (src_bg.mp4)
    mask_video: Any = None  # replace mode: white where the character goes (src_mask.mp4)
    mode: str | None = None  # "animate" (default) or "replace"
    segment_frame_length: int | None = None  # frames per generated segment, 4k+1 (default 77)
    prev_segment_conditioning_frames: int | None = None  # frames each segment continues from: 1 or 5


@dataclass(frozen=True)
class ConditioningInputs:
    """A request's images and video, preprocessed for the executor (None: not given).

    condition_pixels (K, 3, H, W) float32 in [-1, 1]: the first (and last) frame at the output size;
    clip_pixels (K, 3, S, S) float32: the same images as CLIP sees them (Wan 2.1 I2V / FLF2V);
    video_pixels (3, F, H, W) float32 in [-1, 1]: the video-to-video input; strength: how much of it
    is re-noised.

    Wan2.2-Animate (None elsewhere): condition_pixels (1, 3, H, W) is the character fitted on a black
    canvas, clip_pixels (1, 3, S, S) its CLIP view; the driving videos at their final sizes as uint8,
    reflected to T' frames (every segment's frames, T' >= the output's): pose_frames (T', H, W, 3),
    face_frames (T', M, M, 3) (M: the motion encoder's size), background_frames (T', H, W, 3) and
    mask_frames (T', H, W) grey levels (replace mode; None in animate mode); segment_noise
    (N - 1, C, f, h, w) float32 the initial noise of segments 2..N (None for one segment);
    segment_frame_length and prev_segment_conditioning_frames."""

    condition_pixels: np.ndarray | None = None
    clip_pixels: np.ndarray | None = None
    video_pixels: np.ndarray | None = None
    strength: float | None = None
    pose_frames: np.ndarray | None = None
    face_frames: np.ndarray | None = None
    background_frames: np.ndarray | None = None
    mask_frames: np.ndarray | None = None
    segment_noise: np.ndarray | None = None
    segment_frame_length: int | None = None
    prev_segment_conditioning_frames: int | None = None

    @property
    def segments(self) -> int:
        """How many segments the video is made in (1 except Animate's long driving videos)."""
        return 1 if self.segment_noise is None else 1 + len(self.segment_noise)

    @property
    def shapes(self) -> tuple:
        """What a batch must share: the shapes of the arrays given."""
        return (
            tuple(
                None if a is None else a.shape
                for a in (self.condition_pixels, self.clip_pixels, self.video_pixels)
            )
            + self._animate_shapes
        )

    @property
    def _animate_shapes(self) -> tuple:
        """Animate: the driving videos' shapes, the segments and their length and overlap."""
        arrays = (
            self.pose_frames,
            self.face_frames,
            self.background_frames,
            self.mask_frames,
            self.segment_noise,
        )
        return tuple(None if a is None else a.shape for a in arrays) + (
            self.segment_frame_length,
            self.prev_segment_conditioning_frames,
        )


@dataclass(frozen=True)
class Approximations:
    """Opt-in approximations of one request (None: the runtime options' default, off unless set).

    residual_threshold: the step cache's threshold (skip the DiT while its input changes less);
    cfg_truncation: the fraction of the steps that run classifier-free guidance."""

    residual_threshold: float | None = None
    cfg_truncation: float | None = None


@dataclass
class WanContext:
    """One request's state, as the executor reads it (MAX's ``WanContext``).

    Shapes: tokens/mask (L,), negative_tokens/negative_mask (L,) or None when no classifier-free
    guidance is done, latents (C, f, h, w) the initial noise; ``schedule`` holds timesteps (N,), sigmas
    (N+1,) and step_coefficients (N, K) (also readable under MAX's flat names).
    """

    request_id: str
    tokens: np.ndarray
    mask: np.ndarray
    negative_tokens: np.ndarray | None
    negative_mask: np.ndarray | None
    explicit_negative_prompt: bool
    schedule: Schedule
    latents: np.ndarray
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    seed: int
    fps: int = 16
    guidance_scale_2: float | None = None
    boundary_timestep: float | None = None
    conditioning: ConditioningInputs = field(default_factory=ConditioningInputs)
    approximations: Approximations = field(default_factory=Approximations)
    status: GenerationStatus = GenerationStatus.ACTIVE

    @property
    def timesteps(self) -> np.ndarray:
        return self.schedule.timesteps

    @property
    def sigmas(self) -> np.ndarray:
        return self.schedule.sigmas

    @property
    def step_coefficients(self) -> np.ndarray:
        return self.schedule.step_coefficients

    @property
    def do_classifier_free_guidance(self) -> bool:
        """The reference runs the unconditional branch only when guidance_scale > 1."""
        return self.guidance_scale > 1.0

    @property
    def batch_key(self) -> tuple:
        """Contexts with equal keys can run together in one executor batch."""
        return (
            self.latents.shape,
            self.num_frames,
            self.num_inference_steps,
            self.schedule.kind,
            self.timesteps.tobytes(),
            self.step_coefficients.tobytes(),
            self.boundary_timestep,
            self.conditioning.shapes,
            self.approximations,
        )
