"""The OpenAPI document of ``wanpipe serve`` (``GET /openapi.json``, ``/docs``).

FastAPI describes the routes, their parameters, the response models and the error statuses declared
next to each route (:func:`errors`). This module adds what FastAPI cannot see, because the two create
routes read their bodies themselves (:mod:`wanpipe.serving.parsing`):

* the request bodies of ``POST /v1/videos`` (JSON, multipart form, urlencoded form) and
  ``POST /v1/responses``, with the patterns the parser itself matches (numbers given as text), and
  this server's ``--max-frames`` and ``--max-steps``;
* the bearer key, when the server has one;
* once the model is loaded, an example request that this server accepts (the checkpoint's defaults,
  shrunk to its limits).

What a schema cannot state is said in words, and answered 400 (or 404 for another model): sizes that
are multiples of the checkpoint's spatial multiple within ``--max-pixels``, ``4k+1`` frames, ``seconds``
that agree with ``num_frames``, whether the checkpoint takes an image, an image that decodes, a preset
that fits the checkpoint.
tests/test_openapi.py runs schemathesis with all its checks against a live server on this document.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from fastapi.openapi.utils import get_openapi

from wanpipe.presets import PRESETS
from wanpipe.serving.parsing import (
    EXPONENT,
    FLOAT_TEXT,
    FLOW_SHIFT_RANGE,
    GUIDANCE_RANGE,
    MANTISSA,
    MAX_NUMBER_TEXT,
    MAX_REFERENCE_IMAGES,
    SAMPLERS,
    SIZE_TEXT,
    SPACE,
    VIDEO_CREATE_FIELDS,
    VIDEO_OPTION_FIELDS,
    ServeLimits,
)
from wanpipe.serving.schemas import ErrorResponse
from wanpipe.tokenizer import MAX_SEED

if TYPE_CHECKING:
    from fastapi import FastAPI

    from wanpipe.config import WanArchConfig

# ---------------------------------------------------------------------------------------------------------
# Error responses, declared next to each route

ERROR_MEANINGS = {
    400: "An invalid request: a malformed body, an unknown field, a value out of range or against the "
    "checkpoint's rules, a request over this server's limits (`code` says which: `invalid_value`, "
    "`limit_exceeded`, `invalid_image`, `invalid_json`, `invalid_form`, `unknown_parameter`, ...; "
    "`param` names the field).",
    401: "No API key, or a wrong one (`code` `invalid_api_key`).",
    404: "No such video (`code` `not_found`), or a model this server does not serve (`model_not_found`).",
    409: "The video is not completed yet (`video_not_ready`), or was deleted while waited for (`cancelled`).",
    413: "The request body is larger than `--max-body-mb` (`request_too_large`).",
    415: "A body that is neither JSON nor a form (`unsupported_media_type`).",
    429: "The queue is full (`queue_full`); `Retry-After` says when to try again.",
    500: "An internal error, or (POST /v1/responses) a generation that failed: `code` is the job's error "
    "code (`out_of_memory`, `generation_failed`, ...).",
    503: "The model is still loading (`model_loading`, with `Retry-After`), failed to load "
    "(`model_failed`), or the server is shutting down (`shutting_down`).",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "required": True, "schema": {"type": "string"}}},
    429: {
        "Retry-After": {
            "description": "Seconds until the queue has room, roughly.",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    },
    503: {
        "Retry-After": {
            "description": "Seconds to wait (while the model loads, or a server shutting down).",
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    },
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route: each status with the error body and what it means (and 500, which
    any route can answer)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*statuses, 500}):
        out[status] = {"model": ErrorResponse, "description": ERROR_MEANINGS[status]}
        if status in _HEADERS:
            out[status]["headers"] = _HEADERS[status]
    return out


POLL_HEADER = {
    "openai-poll-after-ms": {
        "description": "While the video is queued or running: milliseconds to wait before asking again.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}

# ---------------------------------------------------------------------------------------------------------
# Value patterns: the parser's own (parsing.INT_TEXT, FLOAT_TEXT, SIZE_TEXT), narrowed to a minimum


_ZERO = r"(?:0+\.?0*|\.0+)"
INT_MIN_0 = rf"{SPACE}(?:\+?[0-9]+|-0+){SPACE}"
INT_MIN_1 = rf"{SPACE}\+?0*[1-9][0-9]*{SPACE}"
FLOAT_ANY = FLOAT_TEXT  # any float the parser takes
FLOAT_MIN_0 = rf"{SPACE}(?:\+?{MANTISSA}|-{_ZERO}){EXPONENT}{SPACE}"
FLOAT_ABOVE_0 = rf"{SPACE}\+?(?:[0-9]*[1-9][0-9]*\.?[0-9]*|[0-9]*\.[0-9]*[1-9][0-9]*){EXPONENT}{SPACE}"


def text_schema(pattern: str, bounded: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "pattern": f"^{pattern}$"}
    if bounded:
        schema["maxLength"] = MAX_NUMBER_TEXT
    return schema


def _field(description: str, *alternatives: dict[str, Any], nullable: bool) -> dict[str, Any]:
    options = [*alternatives, {"type": "null"}] if nullable else list(alternatives)
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "description": description}


def _integer(minimum: int, maximum: int | None, description: str, *, json: bool) -> dict[str, Any]:
    number: dict[str, Any] = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        number["maximum"] = maximum
    text = text_schema(INT_MIN_1 if minimum == 1 else INT_MIN_0)
    if not json:
        return _field(description, text, nullable=False)
    return _field(description, number, text, nullable=True)


def _number(
    description: str,
    *,
    json: bool,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
) -> dict[str, Any]:
    """A number: JSON's with its bounds, or text whose pattern states the sign only (``minimum`` 0:
    no minus; ``above``: no zero either). A bound the pattern cannot state is said in the description."""
    number: dict[str, Any] = {"type": "number"}
    if minimum is not None:
        number["minimum"] = minimum
    if above is not None:
        number["exclusiveMinimum"] = above
    if maximum is not None:
        number["maximum"] = maximum
    if minimum is not None and minimum > 0 or above is not None:
        text = text_schema(FLOAT_ABOVE_0)
    elif minimum == 0:
        text = text_schema(FLOAT_MIN_0)
    else:
        text = text_schema(FLOAT_ANY)
    if not json:
        return _field(description, text, nullable=False)
    return _field(description, number, text, nullable=True)


def _guidance(what: str, *, json: bool) -> dict[str, Any]:
    low, high = GUIDANCE_RANGE
    return _number(f"{what}, in [{low:g}, {high:g}].", json=json, minimum=low, maximum=high)


def _flow_shift(*, json: bool) -> dict[str, Any]:
    low, high = FLOW_SHIFT_RANGE
    description = f"Schedule shift, in [{low:g}, {high:g}]. Default: the checkpoint's."
    return _number(description, json=json, minimum=low, maximum=high)


def _fps(description: str, *, json: bool) -> dict[str, Any]:
    return _number(description, json=json, above=0, maximum=240)


def _preset(*, json: bool) -> dict[str, Any]:
    """A known preset's name; one that does not fit the served checkpoint's kind gets 400 (in words)."""
    fits = "; ".join(f"{p.name}: {' or '.join(p.fits)}" for p in PRESETS.values())
    description = (
        "A published few-step setting (steps, sampler, step list, shift, guidance) that fills the values "
        f"left out; explicit values win. Each fits some checkpoints only (another: 400): {fits}. "
        "GET /v1/models lists them."
    )
    return _field(description, {"type": "string", "enum": list(PRESETS)}, nullable=json)


def _string(description: str, *, json: bool) -> dict[str, Any]:
    return _field(description, {"type": "string"}, nullable=json)


LIST_TEXT = rf"{FLOAT_TEXT}(?:,{FLOAT_TEXT})*"  # parsing.parse_number_list's text: numbers and commas
SCHEDULE_WORDS = (
    "Used as given, not shifted again; one value per step (it sets num_inference_steps, or must equal "
    "it), strictly decreasing, each number as text at most {chars} characters; give sigmas or timesteps, "
    "not both. See docs/fast-sampling.md."
)


def _sampler(*, json: bool) -> dict[str, Any]:
    values: list[Any] = list(SAMPLERS) + ([None] if json else [])
    return {
        "enum": values,
        "description": "unipc, euler, lcm or dmd (the step-list sampler of distilled checkpoints). "
        "Default: the checkpoint's scheduler.",
    }


def _schedule_list(what: str, maximum: float, limits: ServeLimits, *, json: bool) -> dict[str, Any]:
    """sigmas / timesteps: a JSON array of numbers in (0, maximum], or the numbers as text with commas."""
    text = {
        **text_schema(LIST_TEXT, bounded=False),
        "description": "numbers separated by commas, e.g. 0.9,0.6",
    }
    description = f"{what}, each in (0, {maximum:g}], at most {limits.max_steps} (--max-steps). " + (
        SCHEDULE_WORDS.format(chars=MAX_NUMBER_TEXT)
    )
    if not json:
        return _field(description, text, nullable=False)
    array = {
        "type": "array",
        "items": {"type": "number", "exclusiveMinimum": 0, "maximum": maximum},
        "minItems": 1,
        "maxItems": limits.max_steps,
    }
    return _field(description, array, text, nullable=True)


def _schedule_fields(limits: ServeLimits, *, json: bool) -> dict[str, Any]:
    return {
        "sampler": _sampler(json=json),
        "sigmas": _schedule_list("The schedule's own sigmas (the trailing 0 implied)", 1, limits, json=json),
        "timesteps": _schedule_list(
            "The schedule's own timesteps on the 0-1000 scale (sigma = t / 1000; e.g. 1000,750,500,250)",
            1000,
            limits,
            json=json,
        ),
    }


NON_BLANK = r"\S"  # some character that str.strip() keeps
CACHES = ["first-block", "teacache", "taylorseer", "magcache", "none"]
CACHE_FORM_KEY = r"^cache_options\[[A-Za-z_][A-Za-z0-9_]*\]$"


def _cache(*, json: bool) -> dict[str, Any]:
    return _field(
        "Step cache (an approximation): first-block, teacache, taylorseer (Modular MAX's), magcache, or none. "
        "Default: none.",
        {"type": "string", "enum": CACHES},
        nullable=json,
    )


def _cache_options(*, json: bool) -> dict[str, Any]:
    description = (
        "The options of cache, as in diffusers (taylorseer: cache_interval, disable_cache_before_step, "
        "disable_cache_after_step, max_order, use_lite_mode; magcache: threshold, max_skip_steps, "
        "retention_ratio, mag_ratios as numbers; first-block, teacache: threshold, coefficients), checked "
        "against the cache and the checkpoint (400 with param cache_options); no calibrate or files here. "
        + (
            "An object, or its JSON text."
            if json
            else "JSON text, or one cache_options[KEY] field per option."
        )
    )
    if not json:
        return {"type": "string", "description": description}
    return _field(description, {"type": "object"}, {"type": "string"}, nullable=True)


DATA_URL = "a base64 data URL (data:image/png;base64,...); the server fetches no http(s) URL"
IMAGE_FILE = "an image file: PNG, JPEG, WebP, GIF or BMP, a still image whose type matches its content type"


def video_create_schema(limits: ServeLimits, form: str | None = None) -> dict[str, Any]:
    """The body of ``POST /v1/videos``: JSON (``form=None``), or ``"multipart"`` / ``"urlencoded"`` form
    fields (every value text; multipart images as files)."""
    json = form is None
    frames = (
        f"Frames: 4k+1 (1, 5, 9, ...: the checkpoint's temporal stride is 4), at most {limits.max_frames} "
        "(--max-frames). Default: the checkpoint's."
    )
    image_ref = "The first frame, for image-to-video checkpoints (a text-to-video one refuses it): " + (
        f"{IMAGE_FILE}, or {DATA_URL}" if form == "multipart" else DATA_URL
    )
    properties: dict[str, Any] = {
        "prompt": {"type": "string", "pattern": NON_BLANK, "description": "What the video shows."},
        "model": _string("The served model's name (another: 404). Default: the served model.", json=json),
        "size": _field(
            f"WIDTHxHEIGHT in pixels, e.g. 832x480: multiples of the checkpoint's spatial multiple (16 for "
            f"Wan 2.1), width x height at most {limits.max_pixels} (--max-pixels). Default: the checkpoint's.",
            text_schema(SIZE_TEXT, bounded=False),
            nullable=json,
        ),
        "seconds": _number(
            "Duration: S seconds at fps give 4*round(S*fps/4)+1 frames (at most --max-frames); with "
            "num_frames too, both must agree.",
            json=json,
            minimum=0,
        ),
        "negative_prompt": _string("What the video should not show.", json=json),
        "num_frames": _integer(1, limits.max_frames, frames, json=json),
        "fps": _fps("Playback rate of the file, in (0, 240]. Default: the checkpoint's.", json=json),
        "num_inference_steps": _integer(
            1, limits.max_steps, f"Denoising steps, at most {limits.max_steps} (--max-steps).", json=json
        ),
        "guidance_scale": _guidance("Classifier-free guidance scale", json=json),
        "guidance_scale_2": _guidance(
            "Guidance of the low-noise expert (two-expert checkpoints only: Wan 2.2 A14B)", json=json
        ),
        "flow_shift": _flow_shift(json=json),
        "seed": _integer(
            0, MAX_SEED, f"Noise seed, 0 to {MAX_SEED}. Default: drawn (the job reports it).", json=json
        ),
        "input_reference": None,
        "last_image": None,
        **_schedule_fields(limits, json=json),
        "preset": _preset(json=json),
        "cache": _cache(json=json),
        "cache_options": _cache_options(json=json),
    }
    last = "The last frame (first-last-frame checkpoints; needs input_reference too): "
    if json:
        image_url = {
            "type": "object",
            "properties": {"image_url": {"type": "string", "description": DATA_URL}},
            "required": ["image_url"],
            "additionalProperties": False,
        }
        for name, what in (("input_reference", image_ref), ("last_image", last + DATA_URL)):
            properties[name] = _field(what, {"type": "string"}, image_url, nullable=True)
    else:
        image = {"type": "string", "format": "binary"} if form == "multipart" else {"type": "string"}
        properties["input_reference"] = {**image, "description": image_ref}
        last += f"{IMAGE_FILE}, or {DATA_URL}" if form == "multipart" else DATA_URL
        properties["last_image"] = {**image, "description": last}
        # OpenAI's ImageInputReferenceParam, as the SDK sends it in a form
        for name in ("input_reference", "last_image"):
            properties[f"{name}[image_url]"] = {
                "type": "string",
                "description": f"{name} as {DATA_URL} (one of {name} and {name}[image_url])",
            }
    properties.update(_vace_properties(form))
    properties.update(_animate_properties(form, json=json))
    assert set(properties) - {"input_reference[image_url]", "last_image[image_url]"} == set(
        VIDEO_CREATE_FIELDS
    )
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": ["prompt"],
        "additionalProperties": False,
    }
    if not json:
        schema["patternProperties"] = {
            CACHE_FORM_KEY: {"type": "string", "description": "One option of cache (see cache_options)."}
        }
    return schema


VIDEO_DATA_URL = "a base64 data URL (data:video/mp4;base64,...)"
VIDEO_FILE = "a video file: MP4, MOV, WebM/Matroska, AVI, or an animated GIF or WebP"


def _vace_properties(form: str | None) -> dict[str, Any]:
    """VACE's fields (a checkpoint without VACE blocks refuses each of them; docs/vace.md)."""
    multipart = form == "multipart"
    upload = {"type": "string", "format": "binary"} if multipart else {"type": "string"}
    video = "VACE checkpoints: the control or source video, at least as large as the output (resized to it): "
    mask = (
        "VACE checkpoints, with video: white = generate, black = keep; one image for every frame, or a "
        "video of one mask frame per video frame, at the video's size: "
    )
    reference = (
        f"VACE checkpoints: a reference image (a subject, face or object), at most {MAX_REFERENCE_IMAGES}"
    )
    scale = "VACE checkpoints: the control's strength, one number or one per VACE layer. Default 1."
    both = f"{IMAGE_FILE}, or {VIDEO_FILE}"
    if form is None:
        image = {"type": "string", "description": DATA_URL}
        image_url = {
            "type": "object",
            "properties": {"image_url": image},
            "required": ["image_url"],
            "additionalProperties": False,
        }
        numbers = {"type": "array", "items": {"type": "number"}, "minItems": 1}
        return {
            "video": _field(video + VIDEO_DATA_URL, {"type": "string"}, nullable=True),
            "mask": _field(mask + f"{DATA_URL}, or {VIDEO_DATA_URL}", {"type": "string"}, nullable=True),
            "reference_image": _field(
                reference + f" (a list for several): {DATA_URL}",
                image,
                image_url,
                {"type": "array", "items": {"anyOf": [image, image_url]}, "maxItems": MAX_REFERENCE_IMAGES},
                nullable=True,
            ),
            "conditioning_scale": _field(
                scale, {"type": "number"}, text_schema(FLOAT_ANY), numbers, nullable=True
            ),
        }
    listed = rf"{FLOAT_ANY}(?:,{FLOAT_ANY})*"
    return {
        "video": {**upload, "description": video + (VIDEO_FILE if multipart else VIDEO_DATA_URL)},
        "mask": {**upload, "description": mask + (both if multipart else f"{DATA_URL}, or {VIDEO_DATA_URL}")},
        "reference_image": {
            "type": "array",
            "items": upload,
            "maxItems": MAX_REFERENCE_IMAGES,
            "description": reference
            + f" (the field repeated for several): {IMAGE_FILE if multipart else DATA_URL}",
        },
        "conditioning_scale": {**text_schema(listed, bounded=False), "description": scale + " X or X,Y,..."},
    }


def _animate_properties(form: str | None, *, json: bool) -> dict[str, Any]:
    """Wan2.2-Animate's fields (other checkpoints refuse each; docs/animate.md). input_reference is the
    character there; the videos are the original preprocessing script's, with one frame per pose frame."""
    video = VIDEO_FILE if form == "multipart" else VIDEO_DATA_URL
    upload = {"type": "string", "format": "binary"} if form == "multipart" else {"type": "string"}
    what = {
        "pose_video": "Animate: the driving pose video (src_pose.mp4); the output is as long",
        "face_video": "Animate: the driving face video (src_face.mp4), one frame per pose frame",
        "background_video": 'Animate, mode "replace": the driving video without its person (src_bg.mp4)',
        "mask_video": 'Animate, mode "replace": white where the character goes (src_mask.mp4)',
    }
    out = {name: _field(f"{text}: {video}", upload, nullable=json) for name, text in what.items()}
    mode = {"type": "string", "enum": ["animate", "replace"]}
    out["mode"] = _field(
        "Animate: animate (default) the character, or replace the person", mode, nullable=json
    )
    out["segment_frame_length"] = _integer(
        5, None, "Animate: frames per segment, 4k+1. Default 77.", json=json
    )
    out["prev_segment_conditioning_frames"] = _field(
        "Animate: frames each segment continues from, 1 (default) or 5",
        {"type": "integer", "enum": [1, 5]} if json else text_schema(r" *[15] *", bounded=False),
        nullable=json,
    )
    return out


def responses_create_schema(limits: ServeLimits) -> dict[str, Any]:
    """The body of ``POST /v1/responses`` (Open Responses as MAX serves it)."""
    text_part = {
        "type": "object",
        "properties": {"type": {"const": "input_text"}, "text": {"type": "string"}},
        "required": ["type", "text"],
    }
    image_part = {
        "type": "object",
        "properties": {
            "type": {"const": "input_image"},
            "image_url": {"type": "string", "description": DATA_URL},
        },
        "required": ["type", "image_url"],
    }
    prompt_part = {
        **text_part,
        "properties": {**text_part["properties"], "text": {"type": "string", "pattern": NON_BLANK}},
    }
    message = {
        "type": "object",
        "description": "One user message: a prompt, or input_text parts (joined: the prompt) and up to two "
        "input_image parts (the first frame, and the last one), for image-to-video checkpoints.",
        "properties": {
            "type": {"const": "message"},
            "role": {"const": "user"},
            "content": {
                "anyOf": [
                    {"type": "string", "pattern": NON_BLANK},
                    {"type": "array", "items": {"anyOf": [text_part, image_part]}, "contains": prompt_part},
                ]
            },
        },
        "required": ["content"],
    }
    options = {
        "height": _integer(1, None, "Height in pixels (a multiple of the spatial multiple).", json=True),
        "width": _integer(1, None, "Width in pixels; width x height at most --max-pixels.", json=True),
        "num_frames": _integer(1, limits.max_frames, "Frames, 4k+1, at most --max-frames.", json=True),
        "steps": _integer(1, limits.max_steps, "Denoising steps, at most --max-steps.", json=True),
        "guidance_scale": _guidance("Classifier-free guidance scale", json=True),
        "guidance_scale_2": _guidance("Guidance of the low-noise expert (Wan 2.2 A14B)", json=True),
        "negative_prompt": _string("What the video should not show.", json=True),
        "flow_shift": _flow_shift(json=True),
        "frames_per_second": _fps("Playback rate, in (0, 240].", json=True),
        "response_format": {
            "enum": ["url", "b64_json", None],
            "description": "url (default): output_video.video_url; b64_json: the mp4 in video_data.",
        },
        **_schedule_fields(limits, json=True),
        "preset": _preset(json=True),
        "cache": _cache(json=True),
        "cache_options": _cache_options(json=True),
    }
    assert set(options) == set(VIDEO_OPTION_FIELDS)
    return {
        "type": "object",
        "description": "Other Open Responses fields (temperature, tools, ...) are accepted and ignored.",
        "properties": {
            "model": _string("The served model's name (another: 404).", json=True),
            "input": {
                "anyOf": [
                    {"type": "string", "pattern": NON_BLANK},
                    message,
                    {"type": "array", "items": message, "minItems": 1, "maxItems": 1},
                ],
                "description": "The prompt, or one user message.",
            },
            "seed": _integer(0, MAX_SEED, "Noise seed. Default: drawn.", json=True),
            "stream": {"enum": [False, None], "description": "Streaming is not supported."},
            "provider_options": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "video": {
                                "anyOf": [
                                    {"type": "object", "properties": options, "additionalProperties": False},
                                    {"type": "null"},
                                ]
                            },
                            "image": {"type": "null", "description": "Image generation is not served here."},
                        },
                    },
                    {"type": "null"},
                ]
            },
        },
        "required": ["input"],
    }


# ---------------------------------------------------------------------------------------------------------
# An example this server accepts


def example_size(arch: WanArchConfig, limits: ServeLimits) -> tuple[int, int]:
    """The checkpoint's default (width, height), or the largest size of its aspect on the spatial
    multiple within ``--max-pixels``."""
    d, m = arch.defaults, arch.spatial_multiple
    if d.width * d.height <= limits.max_pixels:
        return d.width, d.height
    best = (m, m)
    for height in range(m, d.height + 1, m):
        width = max(m, round(height * d.width / d.height / m) * m)
        if width * height <= limits.max_pixels:
            best = (width, height)
    return best


def _examples(arch: WanArchConfig, limits: ServeLimits) -> dict[str, dict[str, Any]] | None:
    d, stride = arch.defaults, arch.temporal_stride
    width, height = example_size(arch, limits)
    if width * height > limits.max_pixels:
        return None
    frames = min(d.num_frames, (limits.max_frames - 1) // stride * stride + 1)
    steps = min(d.num_inference_steps, limits.max_steps)
    prompt = "A red fox trots through fresh snow at dawn"
    video = {
        "prompt": prompt,
        "size": f"{width}x{height}",
        "num_frames": frames,
        "num_inference_steps": steps,
    }
    form = {k: str(v) for k, v in video.items()}
    options = {"height": height, "width": width, "num_frames": frames, "steps": steps}
    responses = {"input": prompt, "seed": 7, "provider_options": {"video": options}}
    return {"json": video, "form": form, "responses": responses}


# ---------------------------------------------------------------------------------------------------------
# The document

DESCRIPTION = (
    "Wan video generation as jobs: the OpenAI Videos API (`/v1/videos`) and Open Responses "
    '(`/v1/responses`). Every error is `{"error": {"message", "type", "param", "code"}}`; a '
    "method a path does not take is 405 with `Allow`."
)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's document: FastAPI's, with the request bodies, the key and (once the model is loaded) the
    examples. Kept once the model is loaded (before, it is built on each call)."""
    cached = getattr(app.state, "openapi_document", None)
    if cached is not None:
        return cached
    manager = app.state.manager
    limits: ServeLimits = manager.limits
    document = get_openapi(title=app.title, version=app.version, routes=app.routes, description=DESCRIPTION)
    paths = document["paths"]
    json_body = video_create_schema(limits)
    forms = {"multipart/form-data": "multipart", "application/x-www-form-urlencoded": "urlencoded"}
    videos_body: dict[str, Any] = {"application/json": {"schema": json_body}}
    for media_type, form in forms.items():
        videos_body[media_type] = {"schema": video_create_schema(limits, form)}
    if "multipart/form-data" in videos_body:
        videos_body["multipart/form-data"]["encoding"] = {
            name: {
                "contentType": "image/png, image/jpeg, image/webp, image/gif, image/bmp, application/octet-stream"
            }
            for name in ("input_reference", "last_image", "reference_image")
        }
        videos_body["multipart/form-data"]["encoding"]["video"] = {
            "contentType": "video/mp4, video/quicktime, video/webm, video/x-matroska, video/x-msvideo, "
            "image/gif, image/webp, application/octet-stream"
        }
        videos_body["multipart/form-data"]["encoding"]["mask"] = {
            "contentType": "image/*, video/*, application/octet-stream"
        }
        for name in ("pose_video", "face_video", "background_video", "mask_video"):
            videos_body["multipart/form-data"]["encoding"][name] = {
                "contentType": "video/*, image/gif, image/webp"
            }
    responses_body = {"application/json": {"schema": responses_create_schema(limits)}}
    examples = _examples(manager.pipe.arch, limits) if manager.ready else None
    if examples is not None:
        videos_body["application/json"]["example"] = examples["json"]
        for media_type in forms:
            videos_body[media_type]["example"] = examples["form"]
        responses_body["application/json"]["example"] = examples["responses"]
    paths["/v1/videos"]["post"]["requestBody"] = {"required": True, "content": videos_body}
    paths["/v1/responses"]["post"]["requestBody"] = {"required": True, "content": responses_body}

    # No route answers 422: FastAPI's validation errors are 400 with the error body here. Every error
    # body is JSON, also on the routes whose success is text (FastAPI puts it under their media type).
    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for operations in paths.values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    response["content"] = copy.deepcopy(error_body)
    for name in ("HTTPValidationError", "ValidationError"):
        document.get("components", {}).get("schemas", {}).pop(name, None)

    if app.state.api_key is not None:
        document.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "--api-key (or $WANPIPE_API_KEY)"}
        }
        for path, operations in paths.items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    else:  # no key, no 401
        for operations in paths.values():
            for operation in operations.values():
                operation["responses"].pop("401", None)
    if examples is not None:
        app.state.openapi_document = document
    return document


# ---------------------------------------------------------------------------------------------------------
# Query parameters the routes read themselves

LIST_PARAMETERS = [
    {
        "name": "after",
        "in": "query",
        "description": "The last id of the previous page (an unknown id: 400, code not_found).",
        "schema": {"type": "string"},
    },
    {
        "name": "limit",
        "in": "query",
        "description": "Videos per page.",
        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
    },
    {
        "name": "order",
        "in": "query",
        "description": "desc: newest first.",
        "schema": {"enum": ["asc", "desc"], "default": "desc"},
    },
]
VARIANT_PARAMETERS = [
    {
        "name": "variant",
        "in": "query",
        "description": "video: the mp4; thumbnail: a JPEG of the first frame.",
        "schema": {"enum": ["video", "thumbnail"], "default": "video"},
    }
]
