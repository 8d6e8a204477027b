"""Typed messages between the layers: a request at the edge, one request's context inside.

``WanRequest`` is what a user (Python, CLI or HTTP) asks for, with ``None`` for "use the default".
``WanContext`` is one validated request's state as the executor consumes it: token ids, the schedule
with its precomputed step coefficients, the initial noise, the resolved sizes, the preprocessed
images/video (:class:`ConditioningInputs`), the opt-in approximations (:class:`Approximations`) and
the status.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from numbers import Integral
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
    # Samplers and schedules (docs/fast-sampling.md). sampler: "unipc" | "euler" | "lcm" | "dmd", None =
    # what the checkpoint's scheduler config names. sigmas: one per step in (0, 1], strictly decreasing,
    # the trailing 0 implied, not shifted again. timesteps: the same on the 0-1000 scale (sigma = t / 1000).
    # Give at most one of sigmas / timesteps; its length is the step count.
    sampler: str | None = None
    sigmas: list[float] | None = None
    timesteps: list[float] | None = None
    # A published few-step setting by name (wanpipe.presets; docs/fast-sampling.md): fills the sampling
    # values left None, and must fit the checkpoint's kind.
    preset: str | None = None
    # VACE checkpoints (docs/vace.md); there ``video`` is the control / source video.
    mask: Any = None  # white = generate, black = keep: one image (every frame) or frames like video
    reference_images: Any = None  # one image or a list (paths, PIL images, arrays): subjects to show
    conditioning_scale: float | list[float] | None = None  # the control's strength, one or per VACE layer
    # The step cache of this request: "first-block", "teacache", "taylorseer", "magcache" or "none"
    # (None: the runtime options' cache), and its options (docs/fast-sampling.md, "Step caches").
    cache: str | None = None
    cache_options: dict[str, Any] | None = None
    # Wan2.2-Animate (docs/animate.md); there ``image`` is the character. Videos are paths, lists of
    # frames or (F, H, W, 3) uint8 arrays, as the original repository's preprocessing writes them.
    pose_video: Any = None  # the driving video's skeleton frames (src_pose.mp4)
    face_video: Any = None  # the driving face, cropped, one frame per pose frame (src_face.mp4)
    background_video: Any = None  # replace mode: the driving video without its person (src_bg.mp4)
    mask_video: Any = None  # replace mode: white where the character goes (src_mask.mp4)
    mode: str | None = None  # "animate" (default) or "replace"
    segment_frame_length: int | None = None  # frames per generated segment, 4k+1 (default 77)
    prev_segment_conditioning_frames: int | None = None  # frames each segment continues from: 1 or 5
    # Context windows for long videos (docs/long-video.md): the latent frames denoised in overlapping
    # windows of ``context_frames`` video frames (4k+1) overlapping by ``context_overlap`` (a multiple
    # of 4, > 0, < context_frames); None: one window, the whole video. context_schedule: one of
    # CONTEXT_SCHEDULES (default "uniform_standard"); context_blend: one of CONTEXT_BLENDS ("linear").
    context_frames: int | None = None
    context_overlap: int | None = None
    context_schedule: str | None = None
    context_blend: str | None = None
    # The final decode (DECODERS): "vae" (None: the same) the full VAE, "tiny" the tiny autoencoder TAEHV
    # (loaded with --tiny-vae / pipe.load_tiny_vae: much faster, lower quality; docs/tiny-decoder.md).
    decoder: str | None = "vae"
    # Live previews (docs/previews.md): one every this many steps (and at the last), when the caller asks
    # for them (a ``preview`` callback); None: DEFAULT_PREVIEW_EVERY.
    preview_every: int | None = None
    # Prompt travel (docs/long-video.md): (start, end, prompt) inclusive ranges of VIDEO frames covering the
    # whole video in order; each context window takes the prompt of its middle frame (replacing
    # ``prompt``, which stays required). Only with context_frames. None: ``prompt`` for every window.
    prompts: list[tuple[int, int, str]] | None = None


CONTEXT_SCHEDULES = ("uniform_standard", "uniform_looped", "static_standard")
"""The window schedules (ComfyUI-WanVideoWrapper's names; wanpipe.stages.windows)."""
CONTEXT_BLENDS = ("linear", "pyramid")
"""How overlapping window predictions are weighted (wanpipe.stages.windows.window_weights)."""


@dataclass(frozen=True)
class ContextWindows:
    """A request's context windows, in LATENT frames: ``frames`` per window, ``overlap`` between
    neighbours (0 < overlap < frames), the ``schedule`` and ``blend`` names."""

    frames: int
    overlap: int
    schedule: str = "uniform_standard"
    blend: str = "linear"
    prompts: tuple[tuple[int, int, str], ...] | None = None
    """Prompt travel's ranges (video frames; wanpipe.prompt_travel), None: the request's prompt."""

    @classmethod
    def of(cls, request: WanRequest, temporal_stride: int = 4) -> ContextWindows | None:
        """A (resolved) request's windows: video frames -> latent frames; None without context_frames."""
        if request.context_frames is None:
            return None
        return cls(
            (request.context_frames - 1) // temporal_stride + 1,
            (request.context_overlap or 0) // temporal_stride,
            request.context_schedule or CONTEXT_SCHEDULES[0],
            request.context_blend or CONTEXT_BLENDS[0],
            None if request.prompts is None else tuple(tuple(r) for r in request.prompts),  # type: ignore[misc]
        )


@dataclass(eq=False)
class PromptTravel:
    """A request's per-window prompts as the executor takes them (wanpipe.prompt_travel): ``prompts``
    the distinct prompts in order of first use, ``tokens``/``mask`` (P, L) their token ids,
    ``frame_prompt[k]`` the prompt index of latent frame k."""

    prompts: tuple[str, ...]
    tokens: np.ndarray
    mask: np.ndarray
    frame_prompt: tuple[int, ...]

    def prompt_of(self, window: list[int]) -> int:
        """The prompt index of a context window (latent frame indices): that of its middle frame."""
        return self.frame_prompt[window[len(window) // 2]]


DECODERS: tuple[str, ...] = ("vae", "tiny")


def resolve_decoder(decoder: Any) -> str:
    """A request's decoder, None -> "vae"; InvalidRequestError (param ``decoder``) unless one of
    :data:`DECODERS`."""
    if decoder is None:
        return "vae"
    if decoder not in DECODERS:
        raise InvalidRequestError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}", "decoder")
    return decoder


DEFAULT_PREVIEW_EVERY = 2
"""Steps between live previews when a request gives none: on the CPU mid-size case the linear preview costs
0.5% of a step, 1.5% with its WebP encode, at every step; 0.7% at every second (bench/bench_preview.py)."""


def resolve_preview_every(value: Any) -> int:
    """A request's ``preview_every``, None -> :data:`DEFAULT_PREVIEW_EVERY`; InvalidRequestError (param
    ``preview_every``) unless a whole number >= 1."""
    if value is None:
        return DEFAULT_PREVIEW_EVERY
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InvalidRequestError(
            f"preview_every must be a whole number of steps, at least 1, got {value!r}", "preview_every"
        )
    return int(value)


@dataclass(frozen=True)
class Preview:
    """One live preview of one request of a batch, sent while denoising (docs/previews.md).

    row: the request's index in the batch (``generate_batch`` / ``run_contexts``); step: the index of
    the denoising step just taken (0-based; ``num_steps - 1`` is the last; across Animate's segments as
    the progress callback counts); frames: (F, h, w, 3) uint8, the current estimate of the clean video
    (x0 = x_t - sigma * v) decoded small (longest side <= 256); fps: the rate that plays them at the
    video's speed (fewer frames than the video for the linear decoder: one per latent frame)."""

    row: int
    step: int
    num_steps: int
    frames: np.ndarray
    fps: float
    decoder: str = "linear"  # "linear" (latent-to-RGB factors) or "tiny" (the tiny VAE, TAEHV)


@dataclass(frozen=True)
class ConditioningInputs:
    """A request's images and video, preprocessed for the executor (None: not given).

    condition_pixels (K, 3, H, W) float32 in [-1, 1]: the first (and last) frame at the output size;
    clip_pixels (K, 3, S, S) float32: the same images as CLIP sees them (Wan 2.1 I2V / FLF2V);
    video_pixels (3, F, H, W) float32 in [-1, 1]: the video-to-video input; strength: how much of it
    is re-noised.

    VACE (None: not a VACE checkpoint, or not given): control_pixels (3, F, H, W) float32 in [-1, 1]
    the control / source video at the output size (None: no video, zeros); control_mask (1, F, H, W)
    float32 in [0, 1], 1 = generate (None: all ones); reference_pixels (R, 3, H, W) float32 in [-1, 1],
    each reference image fitted on a white canvas of the output size, in the order given;
    conditioning_scale (N,) float32, one per VACE layer (set on every VACE request).

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
    control_pixels: np.ndarray | None = None
    control_mask: np.ndarray | None = None
    reference_pixels: np.ndarray | None = None
    conditioning_scale: np.ndarray | None = None
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
                for a in (
                    self.condition_pixels,
                    self.clip_pixels,
                    self.video_pixels,
                    self.control_pixels,
                    self.control_mask,
                    self.reference_pixels,
                    self.conditioning_scale,
                )
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
    cache: str | None = None
    """The request's step cache ("none": off), None: the runtime options' cache."""
    cache_options: CacheOptions | None = None
    """Its resolved options (every default filled in), None with ``cache`` None."""
    context_windows: ContextWindows | None = None
    """Context windows (long videos), None: the whole video at once."""
    decoder: str = "vae"
    """The final decode: "vae" or "tiny" (TAEHV; rows of the two never share a batch)."""

    @classmethod
    def of(cls, request: WanRequest) -> Approximations:
        """A (resolved) request's approximations."""
        options = request.cache_options
        return cls(
            request.residual_threshold,
            request.cfg_truncation,
            request.cache,
            None if options is None else CacheOptions(options),
            ContextWindows.of(request),
            request.decoder or "vae",
        )


class CacheOptions(Mapping[str, Any]):
    """A step cache's options, read-only and hashable (they are part of a batch key): JSON values
    (numbers, booleans, strings, lists and objects of them). Equal when their JSON text is equal."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)
        self._text = json.dumps(self._values, sort_keys=True)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(self._text)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CacheOptions):
            return self._text == other._text
        return isinstance(other, Mapping) and self._values == dict(other)

    def __repr__(self) -> str:
        return f"CacheOptions({self._text})"


@dataclass
class WanContext:
    """One request's state, as the executor reads it (MAX's ``WanContext``).

    Shapes: tokens/mask (L,), negative_tokens/negative_mask (L,) or None when no classifier-free
    guidance is done, latents (C, f, h, w) the initial noise; ``schedule`` holds timesteps (N,), sigmas
    (N+1,) and step_coefficients (N, K) (also readable under MAX's flat names) and its sampler
    (``schedule.kind``); noise_state (S,) uint8 or None: where the step noise of LCM / DMD starts.
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
    # LCM / DMD: the request's seeded CPU generator's state (uint8) after the initial noise, from which
    # each step's fresh noise is drawn (wanpipe.schedulers.StepNoise); None for the other samplers.
    noise_state: np.ndarray | None = None
    preview_every: int | None = None  # steps between live previews (the resolved request's)
    prompt_travel: PromptTravel | None = None  # per-window prompts' tokens (wanpipe.prompt_travel)

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
