"""The HTTP edge of ``wanpipe serve``, inbound: request parsing and OpenAI-style errors.

Two request shapes become one typed message, :class:`NewJob` (a :class:`JobSpec` plus decoded images):

* OpenAI Videos (``POST /v1/videos``, what ``openai.OpenAI().videos.create`` sends): multipart form or
  JSON with ``prompt``, ``model``, ``size`` ("WxH"), ``seconds``, ``input_reference`` and Wan's own
  fields (``negative_prompt``, ``num_frames``, ``fps``, ``num_inference_steps``, ``guidance_scale``,
  ``guidance_scale_2``, ``flow_shift``, ``seed``, ``last_image``).
* Open Responses as Modular MAX serves it (``POST /v1/responses``): ``input`` (a prompt, or one user
  message with ``input_text`` and ``input_image`` parts), ``seed`` and ``provider_options.video``.

Parsing checks types and formats only; the engine's tokenizer checks what depends on the checkpoint
(multiples of 16, 4k+1 frames, ...). Every refusal is an :class:`APIError`, which the app turns into
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status. The response bodies are
in :mod:`wanpipe.serving.schemas`.

``seconds`` -> frames: ``S`` seconds at ``fps`` frames per second give ``4*round(S*fps/4)+1`` frames
(the VAE's temporal stride is 4), so that the first and the last frame are ``S`` seconds apart: 4 s at
16 fps is 65 frames. A response reports ``seconds`` back as ``(num_frames-1)/fps``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps


class APIError(Exception):
    """A refusal with its HTTP status and the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------------------
# What a server accepts


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts: queue length, batch size, and the largest request."""

    max_queue: int = 64
    max_batch: int = 4
    max_pixels: int = 1280 * 720
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


# An uploaded image may have this many times --max-pixels pixels (36.9 M at the default 1280x720: a
# 24-megapixel photo passes); a larger one is refused from its header, before it is decoded.
MAX_IMAGE_PIXELS_FACTOR = 40
DEFAULT_MAX_IMAGE_PIXELS = ServeLimits().max_image_pixels


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

    def api_param(self, name: str | None) -> str | None:
        if name is None or self.param_names is None:
            return name
        return self.param_names.get(name, name)


# ---------------------------------------------------------------------------------------------------------
# Scalars


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# The text forms of numbers (form fields, and JSON strings where a number is expected), ASCII only. The
# OpenAPI document states the same patterns (wanpipe.serving.openapi), so what it calls valid is what
# the parser accepts. At most MAX_NUMBER_TEXT characters; an exponent has at most two digits (every
# such float is finite).
MAX_NUMBER_TEXT = 64
SPACE = r"[ \t\n\r\f\v]*"
INT_TEXT = rf"{SPACE}[+-]?[0-9]+{SPACE}"
MANTISSA = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)"
EXPONENT = r"(?:[eE][+-]?[0-9]{1,2})?"
FLOAT_TEXT = rf"{SPACE}[+-]?{MANTISSA}{EXPONENT}{SPACE}"
SIZE_TEXT = rf"{SPACE}([0-9]{{1,6}}){SPACE}[xX]{SPACE}([0-9]{{1,6}}){SPACE}"


def _number_text(value: Any, pattern: str) -> bool:
    return (
        isinstance(value, str) and len(value) <= MAX_NUMBER_TEXT and re.fullmatch(pattern, value) is not None
    )


def parse_int(value: Any, name: str, minimum: int | None = None) -> int:
    """An integer from JSON (int, integral float) or a form field (decimal string, :data:`INT_TEXT`)."""
    integral = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )
    number = int(value) if integral or _number_text(value, INT_TEXT) else None
    if number is None:
        raise invalid(f"{name} must be an integer, got {_shown(value)}", name)
    if minimum is not None and number < minimum:
        raise invalid(f"{name} must be at least {minimum}, got {number}", name)
    return number


def parse_float(value: Any, name: str) -> float:
    """A finite number from JSON or a form field (:data:`FLOAT_TEXT`)."""
    number: float | None = None
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if numeric or _number_text(value, FLOAT_TEXT):
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = None
    if number is None or not math.isfinite(number):
        raise invalid(f"{name} must be a finite number, got {_shown(value)}", name)
    return number


def parse_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string, got {_shown(value)}", name)
    return value


# Guidance scales and the schedule shift the server takes: the engine takes any guidance >= 0 and any
# shift > 0, but far outside these ranges its frames come out NaN (guidance 1e30, shift 1e-30 or 1e30)
# and the job would fail after running. No checkpoint is used outside them.
GUIDANCE_RANGE = (0.0, 100.0)
FLOW_SHIFT_RANGE = (0.01, 100.0)


def parse_in_range(value: Any, name: str, bounds: tuple[float, float]) -> float:
    """A finite number in ``[low, high]``."""
    number, (low, high) = parse_float(value, name), bounds
    if not low <= number <= high:
        raise invalid(f"{name} must be in [{low:g}, {high:g}], got {number:g}", name)
    return number


def parse_guidance(value: Any, name: str) -> float:
    return parse_in_range(value, name, GUIDANCE_RANGE)


def parse_flow_shift(value: Any, name: str) -> float:
    return parse_in_range(value, name, FLOW_SHIFT_RANGE)


def parse_fps(value: Any, name: str) -> float:
    """A playback rate in (0, 240] frames per second."""
    fps = parse_float(value, name)
    if not 0 < fps <= 240:
        raise invalid(f"{name} must be in (0, 240], got {fps:g}", name)
    return fps


def parse_size(value: Any, name: str = "size") -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` -> (width, height)."""
    match = re.fullmatch(SIZE_TEXT, value) if isinstance(value, str) else None
    if match is None:
        raise invalid(f"{name} must be WIDTHxHEIGHT in pixels, e.g. 832x480, got {_shown(value)}", name)
    return int(match.group(1)), int(match.group(2))


def _optional(values: Mapping[str, Any], prefix: str = "") -> Callable[..., Any]:
    """``opt(name, parse, *args)``: ``values[name]`` parsed as ``prefix + name``, or None if absent or null."""

    def opt(name: str, parse: Callable[..., Any], *args: Any) -> Any:
        value = values.get(name)
        return None if value is None else parse(value, prefix + name, *args)

    return opt


def frames_for_seconds(seconds: float, fps: float, stride: int = 4) -> int:
    """``stride*round(seconds*fps/stride)+1`` frames: the first and last frame ``seconds`` apart."""
    return stride * round(seconds * fps / stride) + 1


def format_seconds(num_frames: int, fps: float) -> str:
    return f"{(num_frames - 1) / fps:g}"


# ---------------------------------------------------------------------------------------------------------
# Images
#
# An upload is checked from its first bytes and its header before anything is decoded: its real type
# (magic bytes) against the type it claims (content type, file name, data URL), a video or an animation
# refused as such, its size against the server's limit. Only then is its one frame decoded.

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what PIL may open here (no EPS, TIFF, PSD, ...)
ACCEPTED_IMAGES = "PNG, JPEG, WebP, GIF or BMP"
_IMAGE_TYPES = {
    "image/png": "PNG",
    "image/apng": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/x-bmp": "BMP",
    "image/x-ms-bmp": "BMP",
}
_IMAGE_EXTENSIONS = {
    ".png": "PNG",
    ".apng": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
    ".webp": "WEBP",
    ".gif": "GIF",
    ".bmp": "BMP",
}
_VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".3gp")


@dataclass(frozen=True)
class Upload:
    """A file of a multipart form: its bytes, and the name and content type the client gave it."""

    data: bytes
    filename: str | None = None
    content_type: str | None = None


def sniff_format(data: bytes) -> str | None:
    """The format the first bytes show: an image format of PIL's, a video container, or None."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    if head[4:8] == b"ftyp":
        return "MP4" if head[8:12] != b"qt  " else "QuickTime"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "WebM/Matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "AVI"
    if head.startswith(b"II*\x00") or head.startswith(b"MM\x00*"):
        return "TIFF"
    return None


_VIDEO_FORMATS = ("MP4", "QuickTime", "WebM/Matroska", "AVI")


def _claimed_format(content_type: str | None, filename: str | None) -> tuple[str, str] | None:
    """(format, what said so) the client claims: its content type, else its file name's extension.
    ``application/octet-stream`` and unknown names claim nothing."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in _IMAGE_TYPES:
        return _IMAGE_TYPES[media], f"content type {media}"
    if media.startswith("video/"):
        return "video", f"content type {media}"
    if media.startswith("image/"):
        return media.removeprefix("image/").upper(), f"content type {media}"
    suffix = Path(filename).suffix.lower() if filename else ""
    if suffix in _IMAGE_EXTENSIONS:
        return _IMAGE_EXTENSIONS[suffix], f"file name {filename!r}"
    if suffix in _VIDEO_EXTENSIONS:
        return "video", f"file name {filename!r}"
    return None


def _bad_image(param: str, message: str) -> APIError:
    return invalid(f"{param}: {message}", param, "invalid_image")


def decode_image(
    data: bytes,
    param: str,
    *,
    max_pixels: int | None = None,
    content_type: str | None = None,
    filename: str | None = None,
) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, WebP, GIF, BMP) -> uint8 (H, W, 3), EXIF orientation applied.

    Refused with a 400 before decoding: an empty file, a video, bytes of another type than the one the
    client names (``content_type``, ``filename``), an image format not in :data:`IMAGE_FORMATS`, an
    animation, more than ``max_pixels`` pixels (read from the header: a decompression bomb is never
    decoded). A truncated or corrupt file is refused when its decoding fails."""
    max_pixels = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if not data:
        raise _bad_image(param, "the image is empty")
    found = sniff_format(data)
    if found in _VIDEO_FORMATS:
        raise _bad_image(
            param, f"this is a video ({found}), not an image: send one frame as {ACCEPTED_IMAGES}"
        )
    claim = _claimed_format(content_type, filename)
    if claim is not None:
        claimed, said = claim
        if claimed == "video":
            raise _bad_image(param, f"the upload is a video ({said}), not an image: send {ACCEPTED_IMAGES}")
        if found is not None and found != claimed:
            raise _bad_image(
                param,
                f"the {said} says {claimed}, but the bytes are a {found} image: the file lies about its type",
            )
    if found not in IMAGE_FORMATS:
        what = f"a {found} image" if found is not None else "not an image this server reads"
        raise _bad_image(param, f"the file is {what}; send {ACCEPTED_IMAGES}")
    try:
        with Image.open(BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise _bad_image(
                    param,
                    f"the image is {width}x{height} ({width * height} pixels), more than this server "
                    f"decodes ({max_pixels}: {MAX_IMAGE_PIXELS_FACTOR} x --max-pixels)",
                )
            if image.format in ("PNG", "GIF", "WEBP") and getattr(image, "is_animated", False):
                raise _bad_image(
                    param, f"the image is an animated {image.format}: send a still image (one frame)"
                )
            image.load()
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB")).copy()
    except APIError:
        raise
    except Image.DecompressionBombError as e:
        raise _bad_image(param, f"the image is too large to decode ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        raise _bad_image(param, f"cannot read the image, truncated or corrupt? ({e})") from None


def decode_data_url(url: str, param: str, *, max_pixels: int | None = None) -> np.ndarray:
    """``data:image/png;base64,...`` -> uint8 (H, W, 3). Web URLs are refused: the server fetches nothing."""
    if re.match(r"(?i)https?://", url):
        raise invalid(
            f"{param}: this server does not fetch URLs; send the image as a file upload or a "
            "data URL (data:image/png;base64,...)",
            param,
            "unsupported_url",
        )
    match = re.fullmatch(r"(?s)data:([\w.+/-]*)((?:;[\w.+-]+=[\w.+-]+)*);base64,(.*)", url.strip())
    if match is None:
        raise invalid(
            f"{param} must be an image upload or a base64 data URL (data:image/png;base64,...)",
            param,
            "invalid_image",
        )
    try:
        data = base64.b64decode(re.sub(r"\s+", "", match.group(3)), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{param}: the data URL is not valid base64", param, "invalid_image") from None
    return decode_image(data, param, max_pixels=max_pixels, content_type=match.group(1) or None)


def parse_image(value: Any, param: str, *, max_pixels: int | None = None) -> np.ndarray:
    """An upload (:class:`Upload` or bytes), a data URL, or ``{"image_url": ...}`` (OpenAI's
    ImageInputReferenceParam)."""
    if isinstance(value, Upload):
        return decode_image(
            value.data, param, max_pixels=max_pixels, content_type=value.content_type, filename=value.filename
        )
    if isinstance(value, bytes):
        return decode_image(value, param, max_pixels=max_pixels)
    if isinstance(value, str):
        return decode_data_url(value, param, max_pixels=max_pixels)
    if isinstance(value, Mapping):
        if "file_id" in value and "image_url" not in value:
            raise invalid(
                f"{param}: file ids are not supported here; upload the image or send a data URL",
                param,
                "unsupported_file_id",
            )
        unknown = sorted(set(value) - {"image_url"})
        if unknown or not isinstance(value.get("image_url"), str):
            raise invalid(f'{param} must be an upload, a data URL or {{"image_url": "data:..."}}', param)
        return decode_data_url(value["image_url"], param, max_pixels=max_pixels)
    raise invalid(f"{param} must be an image upload or a data URL, got {_shown(value)}", param)


# ---------------------------------------------------------------------------------------------------------
# POST /v1/videos

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
)

# How the engine's parameter names read in each API (for the "param" of an error body).
VIDEOS_PARAM_NAMES = {"height": "size", "width": "size", "image": "input_reference"}
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

    opt = _optional(body)
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
    )
    return NewJob(spec, image, last_image, model, VIDEOS_PARAM_NAMES)


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
                f"input parts must be input_text or input_image (with a data URL), got {_shown(part)}",
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

    opt = _optional(video, "provider_options.video.")
    response_format = "url" if video.get("response_format") is None else video["response_format"]
    if response_format not in RESPONSE_FORMATS:
        raise invalid(
            f"provider_options.video.response_format must be url or b64_json, got {_shown(response_format)}",
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
    )
    image = images[0] if images else None
    last_image = images[1] if len(images) == 2 else None
    return NewJob(spec, image, last_image, model, RESPONSES_PARAM_NAMES), response_format
