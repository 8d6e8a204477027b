"""The HTTP edge of ``wanpipe serve``, inbound: request parsing and OpenAI-style errors.

Two request shapes become one typed message, :class:`NewJob` (a :class:`JobSpec` plus decoded images):

* OpenAI Videos (``POST /v1/videos``, what ``openai.OpenAI().videos.create`` sends): multipart form or
  JSON with ``prompt``, ``model``, ``size`` ("WxH"), ``seconds``, ``input_reference`` and Wan's own
  fields (``negative_prompt``, ``num_frames``, ``fps``, ``num_inference_steps``, ``guidance_scale``,
  ``guidance_scale_2``, ``flow_shift``, ``seed``, ``last_image``, ``sampler``, ``sigmas``, ``timesteps``,
  ``preset``, ``cache``, ``cache_options``), VACE's ``video`` (the control video), ``mask`` (an image
  or a video), ``reference_image`` (repeatable; in JSON one or a list) and ``conditioning_scale`` (a number
  or one per VACE layer; in a form ``X`` or ``X,Y,...``), and Wan2.2-Animate's ``pose_video``,
  ``face_video``, ``background_video``, ``mask_video`` (videos: multipart files or JSON data URLs),
  ``mode``, ``segment_frame_length`` and ``prev_segment_conditioning_frames`` (``input_reference`` is the
  character there), and the context windows of long videos: ``context_frames``, ``context_overlap``,
  ``context_schedule``, ``context_blend``.
* Open Responses as Modular MAX serves it (``POST /v1/responses``): ``input`` (a prompt, or one user
  message with ``input_text`` and ``input_image`` parts), ``seed`` and ``provider_options.video``.

``cache`` names a step cache and ``cache_options`` its options (an object; in a form, ``cache_options[KEY]``
fields or one JSON text): the engine checks them (:mod:`wanpipe.runtime.cache_options`). A server does
not read or write files for a client: ``mag_ratios`` is given as numbers, and MagCache's calibration
(which writes a file) is for Python and the command line.

Parsing checks types and formats only; the engine's tokenizer checks what depends on the checkpoint
(multiples of 16, 4k+1 frames, ...). Every refusal is an :class:`APIError`, which the app turns into
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status. The response bodies are
in :mod:`wanpipe.serving.schemas`.

``seconds`` -> frames: ``S`` seconds at ``fps`` frames per second give ``4*round(S*fps/4)+1`` frames
(the VAE's temporal stride is 4), so that the first and the last frame are ``S`` seconds apart: 4 s at
16 fps is 65 frames. A response reports ``seconds`` back as ``(num_frames-1)/fps``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from wanpipe.serving.errors import invalid, shown
from wanpipe.serving.scalars import (
    frames_for_seconds,
    optional_reader,
    parse_bool,
    parse_cache_options,
    parse_float,
    parse_flow_shift,
    parse_fps,
    parse_guidance,
    parse_int,
    parse_loras,
    parse_number_list,
    parse_preset,
    parse_prompts,
    parse_sampler,
    parse_size,
    parse_str,
)
from wanpipe.serving.uploads import (
    DEFAULT_MAX_PIXELS,
    MAX_IMAGE_PIXELS_FACTOR,
    MAX_VIDEO_PIXELS_FACTOR,
    decode_data_url,
    parse_frames,
    parse_image,
    parse_video,
)
from wanpipe.window_request import WINDOW_FIELDS

# ---------------------------------------------------------------------------------------------------------
# What a server accepts


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts: queue length, batch size, and the largest request."""

    max_queue: int = 64
    max_batch: int = 4
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_frames: int = 129
    max_steps: int = 100

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_batch", "max_pixels", "max_frames", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def max_image_pixels(self) -> int:
        """The largest uploaded image decoded: ``MAX_IMAGE_PIXELS_FACTOR`` x ``max_pixels`` (the image is
        resized to the video's size, so a larger one costs memory and nothing more)."""
        return MAX_IMAGE_PIXELS_FACTOR * self.max_pixels

    @property
    def max_video_pixels(self) -> int:
        """The largest frame of an uploaded video decoded: ``MAX_VIDEO_PIXELS_FACTOR`` x ``max_pixels``."""
        return MAX_VIDEO_PIXELS_FACTOR * self.max_pixels


# ---------------------------------------------------------------------------------------------------------
# What a job asks for


@dataclass(frozen=True)
class JobSpec:
    """One job's generation parameters; ``None`` is the checkpoint's default.

    The job store keeps the *resolved* spec (every default filled in, the random seed drawn), so a job
    that is run again after a restart makes the same video.
    """

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    fps: float | None = None  # playback rate of the file; the model's own fps by default
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    flow_shift: float | None = None
    seed: int | None = None
    has_image: bool = False
    has_last_image: bool = False
    sampler: str | None = None  # "unipc" | "euler" | "lcm" | "dmd"; the checkpoint's by default
    sigmas: tuple[float, ...] | None = None  # the schedule's own sigmas, used as given
    timesteps: tuple[float, ...] | None = None  # or its own timesteps (sigma = t / 1000)
    preset: str | None = None  # a few-step preset (wanpipe.presets); the resolved spec holds its values
    # VACE: the uploads kept with the job (store.py), and the resolved scale of each VACE layer
    has_video: bool = False
    has_mask: bool = False
    reference_images: int = 0
    conditioning_scale: float | list[float] | None = None
    cache: str | None = None  # the step cache (resolved name), None: the server's default (none)
    cache_options: dict[str, Any] | None = None  # its options as the client gave them

    # Wan2.2-Animate: the driving videos kept with the job (store.py), the mode and segments resolved
    has_pose_video: bool = False
    has_face_video: bool = False
    has_background_video: bool = False
    has_mask_video: bool = False
    mode: str | None = None
    segment_frame_length: int | None = None
    prev_segment_conditioning_frames: int | None = None
    # LoRA per request (--lora-dir): (name, scale) pairs sorted by name; () is none
    loras: tuple[tuple[str, float], ...] = ()
    # Context windows (long videos, docs/long-video.md): as the client gave them, video frames
    context_frames: int | None = None
    context_overlap: int | None = None
    context_schedule: str | None = None
    context_blend: str | None = None
    decoder: str = "vae"  # the final decode: "vae" or "tiny" (TAEHV, the server's --tiny-vae)
    # live previews (GET /v1/videos/{id}/preview and .../events): on by default in the server; one every
    # preview_every steps (the resolved spec holds the engine's default)
    preview: bool = True
    preview_every: int | None = None
    prompts: tuple[tuple[int, int, str], ...] | None = None  # prompt travel: (start, end, prompt) ranges

    def __post_init__(self) -> None:
        for name in ("sigmas", "timesteps"):  # a list read back from the job store: a tuple again
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if not isinstance(self.loras, tuple) or any(not isinstance(x, tuple) for x in self.loras):
            object.__setattr__(self, "loras", tuple((str(n), float(s)) for n, s in self.loras))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobSpec:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True, eq=False)
class NewJob:
    """A parsed request: the spec, the decoded images (uint8 (H, W, 3)), the model the client named,
    and how the engine's parameter names read in this API (for error bodies)."""

    spec: JobSpec
    image: np.ndarray | None = None
    last_image: np.ndarray | None = None
    model: str | None = None
    param_names: Mapping[str, str] | None = None
    video: np.ndarray | None = None  # uint8 (F, H, W, 3): VACE's control video
    mask: np.ndarray | None = None  # uint8 (M, H, W, 3): one image (M = 1) or one per video frame
    reference_images: tuple[np.ndarray, ...] = ()  # uint8 (H, W, 3) each
    animate_videos: Mapping[str, np.ndarray] | None = None  # Animate: uint8 (F, H, W, 3) by field name

    def api_param(self, name: str | None) -> str | None:
        if name is None or self.param_names is None:
            return name
        return self.param_names.get(name, name)


# ---------------------------------------------------------------------------------------------------------
# POST /v1/videos

ANIMATE_VIDEO_FIELDS = ("pose_video", "face_video", "background_video", "mask_video")

VIDEO_CREATE_FIELDS = (
    "prompt",
    "model",
    "size",
    "seconds",
    "input_reference",
    "negative_prompt",
    "num_frames",
    "fps",
    "num_inference_steps",
    "guidance_scale",
    "guidance_scale_2",
    "flow_shift",
    "seed",
    "last_image",
    "sampler",
    "sigmas",
    "timesteps",
    "preset",
    "video",
    "mask",
    "reference_image",
    "conditioning_scale",
    "cache",
    "cache_options",
    *ANIMATE_VIDEO_FIELDS,
    "mode",
    "segment_frame_length",
    "prev_segment_conditioning_frames",
    "loras",
    *WINDOW_FIELDS,
    "decoder",
    "preview",
    "preview_every",
    "prompts",
)
REPEATED_FORM_FIELDS = ("reference_image",)
"""Form fields that may be given several times (a list)."""
MAX_REFERENCE_IMAGES = 8

# How the engine's parameter names read in each API (for the "param" of an error body).
VIDEOS_PARAM_NAMES = {
    "height": "size",
    "width": "size",
    "image": "input_reference",
    "reference_images": "reference_image",
}
RESPONSES_PARAM_NAMES = {
    "prompt": "input",
    "image": "input",
    "last_image": "input",
    "seed": "seed",
    "height": "provider_options.video.height",
    "width": "provider_options.video.width",
    "num_frames": "provider_options.video.num_frames",
    "num_inference_steps": "provider_options.video.steps",
    "guidance_scale": "provider_options.video.guidance_scale",
    "guidance_scale_2": "provider_options.video.guidance_scale_2",
    "negative_prompt": "provider_options.video.negative_prompt",
    "flow_shift": "provider_options.video.flow_shift",
    "fps": "provider_options.video.frames_per_second",
    "sampler": "provider_options.video.sampler",
    "sigmas": "provider_options.video.sigmas",
    "timesteps": "provider_options.video.timesteps",
    "preset": "provider_options.video.preset",
    "cache": "provider_options.video.cache",
    "cache_options": "provider_options.video.cache_options",
    "loras": "provider_options.video.loras",
    "decoder": "provider_options.video.decoder",
}


def unflatten_form_keys(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Form fields -> a dict; ``a[b]=v`` (how the openai SDK sends a nested object) -> ``{"a": {"b": v}}``.
    A field given twice is refused."""
    out: dict[str, Any] = {}
    for key, value in items:
        match = re.fullmatch(r"([A-Za-z_]\w*)\[([A-Za-z_]\w*)\]", key)
        if match is not None:
            outer, inner = match.groups()
            nested = out.setdefault(outer, {})
            if not isinstance(nested, dict) or inner in nested:
                raise invalid(f"{key} is given more than once", outer)
            nested[inner] = value
        elif key in REPEATED_FORM_FIELDS:
            out.setdefault(key, []).append(value)
        elif key in out:
            raise invalid(f"{key} is given more than once", key)
        else:
            out[key] = value
    return out


def parse_video_create(
    body: Mapping[str, Any],
    *,
    default_fps: float,
    temporal_stride: int = 4,
    max_image_pixels: int | None = None,
    max_frames: int = ServeLimits.max_frames,
    max_video_pixels: int | None = None,
) -> NewJob:
    """The fields of ``POST /v1/videos`` (JSON values, or form strings / :class:`Upload` files) -> NewJob."""
    unknown = sorted(set(body) - set(VIDEO_CREATE_FIELDS))
    if unknown:
        raise invalid(
            f"unknown parameter {unknown[0]!r}; accepted: {', '.join(VIDEO_CREATE_FIELDS)}",
            unknown[0],
            "unknown_parameter",
        )
    if "prompt" not in body:
        raise invalid("prompt is required", "prompt", "missing_required_parameter")
    prompt = parse_str(body["prompt"], "prompt")
    if not prompt.strip():
        raise invalid("prompt must be a non-empty string", "prompt")

    opt = optional_reader(body)
    model = opt("model", parse_str)
    width = height = None
    if body.get("size") is not None:
        width, height = parse_size(body["size"])
    fps = opt("fps", parse_fps)
    num_frames = opt("num_frames", parse_int, 1)
    if body.get("seconds") is not None:
        seconds = parse_float(body["seconds"], "seconds")
        if seconds < 0:
            raise invalid(f"seconds must be >= 0, got {seconds:g}", "seconds")
        if not math.isfinite(seconds * (fps or default_fps)):
            raise invalid(f"seconds={seconds:g} is more frames than any server makes", "seconds")
        frames = frames_for_seconds(seconds, fps or default_fps, temporal_stride)
        if num_frames is not None and num_frames != frames:
            raise invalid(
                f"seconds={seconds:g} at {fps or default_fps:g} fps is {frames} frames, but num_frames is "
                f"{num_frames}; give one of the two",
                "seconds",
            )
        num_frames = frames
    images = {
        name: None if body.get(name) is None else parse_image(body[name], name, max_pixels=max_image_pixels)
        for name in ("input_reference", "last_image")
    }
    image, last_image = images["input_reference"], images["last_image"]
    vace = _parse_vace(body, max_frames, max_image_pixels, max_video_pixels)
    spec = JobSpec(
        prompt=prompt,
        negative_prompt=opt("negative_prompt", parse_str),
        height=height,
        width=width,
        num_frames=num_frames,
        fps=fps,
        num_inference_steps=opt("num_inference_steps", parse_int, 1),
        guidance_scale=opt("guidance_scale", parse_guidance),
        guidance_scale_2=opt("guidance_scale_2", parse_guidance),
        flow_shift=opt("flow_shift", parse_flow_shift),
        seed=opt("seed", parse_int, 0),
        has_image=image is not None,
        has_last_image=last_image is not None,
        sampler=opt("sampler", parse_sampler),
        sigmas=opt("sigmas", parse_number_list),
        timesteps=opt("timesteps", parse_number_list),
        preset=opt("preset", parse_preset),
        has_video=vace["video"] is not None,
        has_mask=vace["mask"] is not None,
        reference_images=len(vace["reference_images"]),
        conditioning_scale=vace["conditioning_scale"],
        cache=opt("cache", parse_str),
        cache_options=opt("cache_options", parse_cache_options),
    )
    videos = _parse_animate_videos(body, max_frames, max_video_pixels)
    spec = replace(
        spec,
        **{f"has_{name}": name in videos for name in ANIMATE_VIDEO_FIELDS},
        mode=opt("mode", parse_str),
        decoder=opt("decoder", parse_str) or "vae",
        segment_frame_length=opt("segment_frame_length", parse_int, 1),
        prev_segment_conditioning_frames=opt("prev_segment_conditioning_frames", parse_int, 1),
        loras=opt("loras", parse_loras) or (),
        context_frames=opt("context_frames", parse_int, 1),
        context_overlap=opt("context_overlap", parse_int, 1),
        context_schedule=opt("context_schedule", parse_str),
        context_blend=opt("context_blend", parse_str),
        preview=opt("preview", parse_bool) is not False,
        preview_every=opt("preview_every", parse_int, 1),
        prompts=opt("prompts", parse_prompts),
    )
    return NewJob(
        spec,
        image,
        last_image,
        model,
        VIDEOS_PARAM_NAMES,
        video=vace["video"],
        mask=vace["mask"],
        reference_images=vace["reference_images"],
        animate_videos=videos or None,
    )


def parse_scales(value: Any, name: str) -> float | list[float]:
    """A number or a list of numbers (JSON); in a form ``X`` or ``X,Y,...``."""
    if isinstance(value, str) and "," in value:
        value = value.split(",")
    if isinstance(value, list):
        if not value:
            raise invalid(f"{name} must be a number or a non-empty list of numbers", name)
        return [parse_float(v, name) for v in value]
    return parse_float(value, name)


def _parse_vace(
    body: Mapping[str, Any], max_frames: int, max_image_pixels: int | None, max_video_pixels: int | None
) -> dict[str, Any]:
    """VACE's fields -> NewJob's video, mask, reference_images and conditioning_scale (checked against
    the checkpoint by the engine)."""
    video_pixels = max_video_pixels or MAX_VIDEO_PIXELS_FACTOR * DEFAULT_MAX_PIXELS
    image_pixels = max_image_pixels or MAX_IMAGE_PIXELS_FACTOR * DEFAULT_MAX_PIXELS
    out: dict[str, Any] = {"video": None, "mask": None}
    if body.get("video") is not None:
        out["video"] = parse_video(body["video"], "video", max_frames=max_frames, max_pixels=video_pixels)
    if body.get("mask") is not None:
        out["mask"] = parse_frames(
            body["mask"],
            "mask",
            max_frames=max_frames,
            max_pixels=video_pixels,
            max_image_pixels=image_pixels,
        )
    refs = body.get("reference_image")
    refs = [] if refs is None else refs if isinstance(refs, list) else [refs]
    if len(refs) > MAX_REFERENCE_IMAGES:
        raise invalid(
            f"reference_image: {len(refs)} images; this server takes at most {MAX_REFERENCE_IMAGES}",
            "reference_image",
        )
    out["reference_images"] = tuple(
        parse_image(r, "reference_image", max_pixels=max_image_pixels) for r in refs
    )
    scale = body.get("conditioning_scale")
    out["conditioning_scale"] = None if scale is None else parse_scales(scale, "conditioning_scale")
    return out


def _parse_animate_videos(
    body: Mapping[str, Any], max_frames: int, max_video_pixels: int | None
) -> dict[str, np.ndarray]:
    """Animate's driving videos given -> uint8 (F, H, W, 3) by name (checked by the engine)."""
    pixels = max_video_pixels or MAX_VIDEO_PIXELS_FACTOR * DEFAULT_MAX_PIXELS
    return {
        name: parse_video(body[name], name, max_frames=max_frames, max_pixels=pixels)
        for name in ANIMATE_VIDEO_FIELDS
        if body.get(name) is not None
    }


# ---------------------------------------------------------------------------------------------------------
# POST /v1/responses (Open Responses, MAX's provider_options.video)

VIDEO_OPTION_FIELDS = (
    "height",
    "width",
    "num_frames",
    "steps",
    "guidance_scale",
    "guidance_scale_2",
    "negative_prompt",
    "flow_shift",
    "frames_per_second",
    "response_format",
    "sampler",
    "sigmas",
    "timesteps",
    "preset",
    "cache",
    "cache_options",
    "loras",
    "decoder",
)
RESPONSE_FORMATS = ("url", "b64_json")


def _parse_input(value: Any, max_image_pixels: int | None) -> tuple[str, list[np.ndarray]]:
    """``input``: a prompt, or one user message (``{"role": "user", "content": str | [parts]}``, alone or
    in a list) whose parts are ``input_text`` and up to two ``input_image`` (first and last frame)."""
    if isinstance(value, str):
        return value, []
    if isinstance(value, list):
        if len(value) != 1:
            raise invalid(f"input must hold exactly one message, got {len(value)}", "input")
        value = value[0]
    if not isinstance(value, Mapping):
        raise invalid("input must be a prompt string or one user message", "input")
    if value.get("type", "message") != "message" or value.get("role", "user") != "user":
        raise invalid('input must be a message with role "user"', "input")
    content = value.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise invalid("input message content must be a string or a list of parts", "input")
    texts: list[str] = []
    images: list[np.ndarray] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "input_text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            images.append(decode_data_url(part["image_url"], "input", max_pixels=max_image_pixels))
        else:
            raise invalid(
                f"input parts must be input_text or input_image (with a data URL), got {shown(part)}",
                "input",
            )
    if len(images) > 2:
        raise invalid(f"input holds {len(images)} images; at most 2 (first and last frame)", "input")
    return " ".join(texts), images


def parse_responses_create(body: Any, *, max_image_pixels: int | None = None) -> tuple[NewJob, str]:
    """An Open Responses body -> (NewJob, response_format). Open Responses fields that do not apply to
    video generation (temperature, tools, ...) are ignored; ``provider_options.video`` is checked strictly."""
    if not isinstance(body, Mapping):
        raise invalid("the request body must be a JSON object", None)
    if body.get("stream") is not None and body["stream"] is not False:
        raise invalid("streaming is not supported for video generation; omit stream", "stream")
    model = None if body.get("model") is None else parse_str(body["model"], "model")
    if "input" not in body:
        raise invalid("input is required", "input", "missing_required_parameter")
    prompt, images = _parse_input(body["input"], max_image_pixels)
    if not prompt.strip():
        raise invalid("input must contain a non-empty prompt", "input")
    seed = None if body.get("seed") is None else parse_int(body["seed"], "seed", 0)
    options = {} if body.get("provider_options") is None else body["provider_options"]
    if not isinstance(options, Mapping):
        raise invalid("provider_options must be an object", "provider_options")
    if options.get("image") is not None:
        raise invalid(
            "this server generates videos: use provider_options.video",
            "provider_options.image",
            "unsupported",
        )
    video = {} if options.get("video") is None else options["video"]
    if not isinstance(video, Mapping):
        raise invalid("provider_options.video must be an object", "provider_options.video")
    unknown = sorted(set(video) - set(VIDEO_OPTION_FIELDS))
    if unknown:
        raise invalid(
            f"unknown parameter provider_options.video.{unknown[0]}; accepted: {', '.join(VIDEO_OPTION_FIELDS)}",
            f"provider_options.video.{unknown[0]}",
            "unknown_parameter",
        )

    opt = optional_reader(video, "provider_options.video.")
    response_format = "url" if video.get("response_format") is None else video["response_format"]
    if response_format not in RESPONSE_FORMATS:
        raise invalid(
            f"provider_options.video.response_format must be url or b64_json, got {shown(response_format)}",
            "provider_options.video.response_format",
        )
    fps = opt("frames_per_second", parse_fps)
    spec = JobSpec(
        prompt=prompt,
        negative_prompt=opt("negative_prompt", parse_str),
        height=opt("height", parse_int, 1),
        width=opt("width", parse_int, 1),
        num_frames=opt("num_frames", parse_int, 1),
        fps=fps,
        num_inference_steps=opt("steps", parse_int, 1),
        guidance_scale=opt("guidance_scale", parse_guidance),
        guidance_scale_2=opt("guidance_scale_2", parse_guidance),
        flow_shift=opt("flow_shift", parse_flow_shift),
        seed=seed,
        has_image=len(images) >= 1,
        has_last_image=len(images) == 2,
        sampler=opt("sampler", parse_sampler),
        sigmas=opt("sigmas", parse_number_list),
        timesteps=opt("timesteps", parse_number_list),
        preset=opt("preset", parse_preset),
        cache=opt("cache", parse_str),
        cache_options=opt("cache_options", parse_cache_options),
        loras=opt("loras", parse_loras) or (),
        decoder=opt("decoder", parse_str) or "vae",
    )
    image = images[0] if images else None
    last_image = images[1] if len(images) == 2 else None
    return NewJob(spec, image, last_image, model, RESPONSES_PARAM_NAMES), response_format
