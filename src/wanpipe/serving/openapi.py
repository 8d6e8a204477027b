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

from wanpipe.serving.openapi_fields import (
    CACHE_FORM_KEY,
    DATA_URL,
    IMAGE_FILE,
    NON_BLANK,
    animate_properties,
    cache_options_schema,
    cache_schema,
    decoder_schema,
    field_schema,
    flow_shift_schema,
    fps_schema,
    guidance_schema,
    integer_schema,
    loras_schema,
    number_schema,
    preset_schema,
    preview_properties,
    schedule_fields_schema,
    string_schema,
    text_schema,
    vace_properties,
    window_properties,
)
from wanpipe.serving.parsing import (
    VIDEO_CREATE_FIELDS,
    VIDEO_OPTION_FIELDS,
    ServeLimits,
)
from wanpipe.serving.scalars import (
    SIZE_TEXT,
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
    404: "No such video (`code` `not_found`), a model this server does not serve (`model_not_found`), or "
    "(GET /v1/videos/{id}/preview) no preview yet (`preview_not_ready`).",
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


def video_create_schema(
    limits: ServeLimits, form: str | None = None, lora_names: list[str] | None = None
) -> dict[str, Any]:
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
        "model": string_schema(
            "The served model's name (another: 404). Default: the served model.", json=json
        ),
        "size": field_schema(
            f"WIDTHxHEIGHT in pixels, e.g. 832x480: multiples of the checkpoint's spatial multiple (16 for "
            f"Wan 2.1), width x height at most {limits.max_pixels} (--max-pixels). Default: the checkpoint's.",
            text_schema(SIZE_TEXT, bounded=False),
            nullable=json,
        ),
        "seconds": number_schema(
            "Duration: S seconds at fps give 4*round(S*fps/4)+1 frames (at most --max-frames); with "
            "num_frames too, both must agree.",
            json=json,
            minimum=0,
        ),
        "negative_prompt": string_schema("What the video should not show.", json=json),
        "num_frames": integer_schema(1, limits.max_frames, frames, json=json),
        "fps": fps_schema("Playback rate of the file, in (0, 240]. Default: the checkpoint's.", json=json),
        "num_inference_steps": integer_schema(
            1, limits.max_steps, f"Denoising steps, at most {limits.max_steps} (--max-steps).", json=json
        ),
        "guidance_scale": guidance_schema("Classifier-free guidance scale", json=json),
        "guidance_scale_2": guidance_schema(
            "Guidance of the low-noise expert (two-expert checkpoints only: Wan 2.2 A14B)", json=json
        ),
        "flow_shift": flow_shift_schema(json=json),
        "seed": integer_schema(
            0, MAX_SEED, f"Noise seed, 0 to {MAX_SEED}. Default: drawn (the job reports it).", json=json
        ),
        "input_reference": None,
        "last_image": None,
        **schedule_fields_schema(limits, json=json),
        "preset": preset_schema(json=json),
        "cache": cache_schema(json=json),
        "cache_options": cache_options_schema(json=json),
        "loras": loras_schema(lora_names, json=json),
        "decoder": decoder_schema(json=json),
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
            properties[name] = field_schema(what, {"type": "string"}, image_url, nullable=True)
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
    properties.update(vace_properties(form))
    properties.update(animate_properties(form, json=json))
    properties.update(window_properties(json=json))
    properties.update(preview_properties(json=json))
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


def responses_create_schema(limits: ServeLimits, lora_names: list[str] | None = None) -> dict[str, Any]:
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
        "height": integer_schema(
            1, None, "Height in pixels (a multiple of the spatial multiple).", json=True
        ),
        "width": integer_schema(1, None, "Width in pixels; width x height at most --max-pixels.", json=True),
        "num_frames": integer_schema(1, limits.max_frames, "Frames, 4k+1, at most --max-frames.", json=True),
        "steps": integer_schema(1, limits.max_steps, "Denoising steps, at most --max-steps.", json=True),
        "guidance_scale": guidance_schema("Classifier-free guidance scale", json=True),
        "guidance_scale_2": guidance_schema("Guidance of the low-noise expert (Wan 2.2 A14B)", json=True),
        "negative_prompt": string_schema("What the video should not show.", json=True),
        "flow_shift": flow_shift_schema(json=True),
        "frames_per_second": fps_schema("Playback rate, in (0, 240].", json=True),
        "response_format": {
            "enum": ["url", "b64_json", None],
            "description": "url (default): output_video.video_url; b64_json: the mp4 in video_data.",
        },
        **schedule_fields_schema(limits, json=True),
        "preset": preset_schema(json=True),
        "cache": cache_schema(json=True),
        "cache_options": cache_options_schema(json=True),
        "loras": loras_schema(lora_names, json=True),
        "decoder": decoder_schema(json=True),
    }
    assert set(options) == set(VIDEO_OPTION_FIELDS)
    return {
        "type": "object",
        "description": "Other Open Responses fields (temperature, tools, ...) are accepted and ignored.",
        "properties": {
            "model": string_schema("The served model's name (another: 404).", json=True),
            "input": {
                "anyOf": [
                    {"type": "string", "pattern": NON_BLANK},
                    message,
                    {"type": "array", "items": message, "minItems": 1, "maxItems": 1},
                ],
                "description": "The prompt, or one user message.",
            },
            "seed": integer_schema(0, MAX_SEED, "Noise seed. Default: drawn.", json=True),
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
    # the LoRA adapters served when the document is made (GET /v1/loras is current); None: no --lora-dir
    lora_names = None if manager.loras is None else [info.name for info in manager.loras.list()] or None
    json_body = video_create_schema(limits, lora_names=lora_names)
    forms = {"multipart/form-data": "multipart", "application/x-www-form-urlencoded": "urlencoded"}
    videos_body: dict[str, Any] = {"application/json": {"schema": json_body}}
    for media_type, form in forms.items():
        videos_body[media_type] = {"schema": video_create_schema(limits, form, lora_names)}
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
    responses_body = {"application/json": {"schema": responses_create_schema(limits, lora_names)}}
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
